"""Tests of salaad_jax.data: tokenizers, synthetic corpus, sources, batching."""

import importlib.util
import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from helpers import NEEDS_SHAKESPEARE, SHAKESPEARE
from salaad_jax import data
from salaad_jax.data.sources import split_stream
from salaad_jax.data import (ByteTokenizer, DocumentStreamDataset,
                             IndexPermutation, SyntheticMarkovCorpus,
                             TokenArrayDataset, get_tokenizer, make_dataset)

ONE_HOST = dict(process_index=0, process_count=1)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def concat_hosts(batches_per_host):
  """Concatenates per-host lists of batches along the batch axis."""
  return [{k: np.concatenate([b[k] for b in bs]) for k in bs[0]}
          for bs in zip(*batches_per_host)]


def check_batch(batch, rows, seq_len):
  assert set(batch) == {'inputs', 'targets', 'mask'}
  for k in ('inputs', 'targets'):
    assert batch[k].shape == (rows, seq_len) and batch[k].dtype == np.int32
  assert batch['mask'].shape == (rows, seq_len)
  assert batch['mask'].dtype == np.float32


@pytest.fixture
def small_text(tmp_path):
  """A 1000-byte file of distinct-ish text; returns (path, token stream)."""
  rng = np.random.default_rng(0)
  text = ''.join(rng.choice(list('abcdefghij \n'), size=1000))
  path = tmp_path / 'small.txt'
  path.write_text(text)
  stream = np.append(np.frombuffer(text.encode(), np.uint8), 0).astype(np.int32)
  return path, stream


# ----------------------------------------------------------------- tokenizers


@hypothesis.given(st.text())
@hypothesis.settings(max_examples=200, deadline=None)
def test_byte_tokenizer_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.size == len(text.encode('utf-8'))
  assert ids.size == 0 or (ids.min() >= 0 and ids.max() < tok.vocab_size)
  assert tok.decode(ids) == text


def test_byte_tokenizer_interface():
  tok = get_tokenizer('byte')
  assert isinstance(tok, data.Tokenizer)
  assert tok.vocab_size == 256 and tok.eos_id == 0
  np.testing.assert_array_equal(tok.encode(b'AB'), [65, 66])
  assert get_tokenizer(tok) is tok
  with pytest.raises(ValueError, match='ids must lie'):
    tok.decode([300])


def test_get_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="'wordpiece'"):
    get_tokenizer('wordpiece')
  missing = tmp_path / 'nope.model'
  with pytest.raises(FileNotFoundError, match='nope.model'):
    get_tokenizer(str(missing))


def test_sentencepiece_tokenizer(tmp_path, small_text):
  spm = pytest.importorskip('sentencepiece')
  lines = [f'the {w} sat on the mat number {i}' for i, w in
           enumerate(['cat', 'dog', 'bird', 'fish'] * 50)]
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(lines))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'sp'), vocab_size=48,
      model_type='unigram', minloglevel=2)
  tok = get_tokenizer(str(tmp_path / 'sp.model'))
  assert isinstance(tok, data.SentencePieceTokenizer)
  assert tok.vocab_size == 48 and tok.eos_id is not None
  ids = tok.encode('the dog sat on the mat')
  assert ids.dtype == np.int32
  assert tok.decode(ids) == 'the dog sat on the mat'
  ds = make_dataset(str(corpus), seq_len=8, batch_size=4,
                    tokenizer=str(tmp_path / 'sp.model'), **ONE_HOST)
  assert ds.vocab_size == 48
  assert next(ds)['inputs'].max() < 48


# ------------------------------------------------------------------ synthetic


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(alphabet_size=8, order=1, branching=2),
    dict(alphabet_size=6, order=3, branching=3, concentration=0.5, seed=3),
])
def test_synthetic_entropy_rate_matches_empirical(kwargs):
  corpus = SyntheticMarkovCorpus(**kwargs)
  k = corpus.order
  # Stationarity of pi under the context chain.
  a, n = corpus.alphabet_size, corpus.num_contexts
  nxt = np.einsum('ar,arc->rc', corpus.stationary.reshape(a, n // a),
                  corpus.transition.reshape(a, n // a, a)).reshape(n)
  np.testing.assert_allclose(nxt, corpus.stationary, atol=1e-12)
  assert 0 < corpus.entropy_rate < 0.6 * np.log(a)  # Structure to learn.

  seq = corpus.sample(400, 257, seed=1)
  nll = -corpus.log_probs(seq)
  body = nll[:, k:]
  se = body.std() / np.sqrt(body.size)
  assert abs(body.mean() - corpus.entropy_rate) < 5 * se + 1e-3
  # The loss floor over a window averages the exact per-position entropies.
  floor = corpus.loss_floor(256)
  targets = nll[:, 1:]
  assert abs(targets.mean() - floor) < 5 * targets.std() / np.sqrt(targets.size)
  h = corpus.conditional_entropies(k + 2)
  assert np.all(np.diff(h) <= 1e-12)  # More context never costs more.
  assert h[-1] == pytest.approx(corpus.entropy_rate)


def test_synthetic_deterministic_per_seed():
  a, b = SyntheticMarkovCorpus(seed=5), SyntheticMarkovCorpus(seed=5)
  np.testing.assert_array_equal(a.transition, b.transition)
  assert a.entropy_rate == b.entropy_rate
  np.testing.assert_array_equal(a.sample(3, 50, seed=2), b.sample(3, 50, seed=2))
  assert not np.array_equal(a.sample(3, 50, seed=2), a.sample(3, 50, seed=3))
  c = SyntheticMarkovCorpus(seed=6)
  assert not np.array_equal(a.transition, c.transition)
  text = ByteTokenizer().decode(a.sample(1, 100)[0])
  assert set(text) <= set(data.synthetic.ALPHABET[:a.alphabet_size])


def test_synthetic_dataset():
  ds = make_dataset('synthetic', seq_len=32, batch_size=8, seed=1, **ONE_HOST)
  assert ds.entropy_rate == pytest.approx(SyntheticMarkovCorpus().entropy_rate)
  assert ds.loss_floor == pytest.approx(ds.corpus.loss_floor(32))
  assert ds.vocab_size == 256
  b = next(ds)
  check_batch(b, 8, 32)
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  again = make_dataset('synthetic', seq_len=32, batch_size=8, seed=1, **ONE_HOST)
  assert_batches_equal([b], [next(again)])
  val = make_dataset('synthetic', seq_len=32, batch_size=8, seed=1,
                     split='validation', **ONE_HOST)
  assert not np.array_equal(next(val)['inputs'], b['inputs'])
  assert len(list(val.eval_batches(3))) == 3
  with pytest.raises(ValueError, match='num_batches'):
    list(val.eval_batches())
  custom = make_dataset('synthetic:order=1,alphabet_size=8', seq_len=8,
                        batch_size=2, **ONE_HOST)
  assert custom.corpus.order == 1 and custom.corpus.alphabet_size == 8


# --------------------------------------------------------------- text sources


@NEEDS_SHAKESPEARE
def test_tinyshakespeare_file():
  raw = SHAKESPEARE.read_bytes()
  train = make_dataset(str(SHAKESPEARE), seq_len=128, batch_size=16, **ONE_HOST)
  val = make_dataset(f'text:{SHAKESPEARE}', seq_len=128, batch_size=16,
                     split='validation', **ONE_HOST)
  assert train.entropy_rate is None and train.vocab_size == 256
  whole = np.concatenate([train.tokens, val.tokens])
  np.testing.assert_array_equal(whole[:-1], np.frombuffer(raw, np.uint8))
  assert whole[-1] == 0  # End-of-document separator.
  assert val.tokens.size == pytest.approx(0.1 * whole.size, abs=1)
  b = next(train)
  check_batch(b, 16, 128)
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  text = train.tokenizer.decode(b['inputs'][0])
  assert text in raw.decode()
  glob_ds = make_dataset(str(SHAKESPEARE.parent / 'tinyshake*.txt'), seq_len=128,
                         batch_size=16, **ONE_HOST)
  assert glob_ds.tokens is train.tokens or np.array_equal(glob_ds.tokens,
                                                          train.tokens)


def test_text_windows_cover_stream(small_text):
  path, stream = small_text
  ds = make_dataset(str(path), seq_len=16, batch_size=4, split='train',
                    val_fraction=0.25, **ONE_HOST)
  n = int(round(stream.size * 0.75))
  np.testing.assert_array_equal(ds.tokens, stream[:n])
  # Evaluation: stream order, tail padded; inputs/targets tile the stream.
  evals = list(ds.eval_batches())
  assert len(evals) == ds.num_eval_batches()
  mask = np.concatenate([b['mask'] for b in evals]).reshape(-1) > 0
  inputs = np.concatenate([b['inputs'] for b in evals]).reshape(-1)[mask]
  targets = np.concatenate([b['targets'] for b in evals]).reshape(-1)[mask]
  np.testing.assert_array_equal(inputs, ds.tokens[:-1])
  np.testing.assert_array_equal(targets, ds.tokens[1:])
  assert len(list(ds.eval_batches(2))) == 2
  # Training: one epoch visits W // G * G distinct windows, no overlap.
  epoch = take(ds, ds.steps_per_epoch)
  assert ds.epoch == 0
  starts = []
  for b in epoch:
    check_batch(b, 4, 16)
    assert b['mask'].all()
    for row in b['inputs']:
      hits = [s for s in range(0, ds.num_windows * 16, 16)
              if np.array_equal(ds.tokens[s:s + 16], row)]
      starts.append(hits[0])
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  assert len(set(starts)) == len(starts) == ds.steps_per_epoch * 4
  next(ds)
  assert ds.epoch == 1


def test_text_shuffle_depends_on_seed(small_text):
  path, _ = small_text
  a = make_dataset(str(path), seq_len=8, batch_size=4, seed=0, **ONE_HOST)
  b = make_dataset(str(path), seq_len=8, batch_size=4, seed=1, **ONE_HOST)
  assert not np.array_equal(next(a)['inputs'], next(b)['inputs'])


# -------------------------------------------------------------------- resume


@pytest.mark.parametrize('n_before,n_after', [(0, 5), (3, 9), (11, 20)])
def test_resume_in_memory_across_epochs(small_text, n_before, n_after):
  path, _ = small_text
  kw = dict(seq_len=16, batch_size=8, seed=4, **ONE_HOST)
  ds = make_dataset(str(path), **kw)
  assert ds.steps_per_epoch == 7  # So the runs below cross epochs.
  take(ds, n_before)
  state = json.loads(json.dumps(ds.get_state()))
  expected = take(ds, n_after)
  fresh = make_dataset(str(path), **kw)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, n_after), expected)
  assert fresh.get_state() == ds.get_state()


def test_resume_synthetic():
  kw = dict(seq_len=16, batch_size=4, seed=2, **ONE_HOST)
  ds = make_dataset('synthetic', **kw)
  take(ds, 3)
  state = json.loads(json.dumps(ds.get_state()))
  expected = take(ds, 4)
  fresh = make_dataset('synthetic', **kw)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)


def _documents(n, seed=0):
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    length = int(rng.integers(0, 40)) if i % 7 else 0  # Some empty docs.
    docs.append(''.join(rng.choice(list('xyzw'), size=length)))
  return docs


def test_streaming_resume_across_epochs():
  docs = _documents(24)
  kw = dict(seq_len=8, batch_size=4, seed=3, tokenizer=ByteTokenizer(), **ONE_HOST)
  ds = DocumentStreamDataset(docs, **kw)
  total = sum(len(d) + 1 for d in docs)
  steps = 3 * total // (8 * 4)  # About three epochs.
  first = take(ds, 7)
  state = json.loads(json.dumps(ds.get_state()))
  rest = take(ds, steps)
  assert max(ds.get_state()['epoch']) >= 2
  fresh = DocumentStreamDataset(docs, **kw)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, steps), rest)
  batches = first + rest
  for b in batches:
    check_batch(b, 4, 8)
    assert b['mask'].all()
  # Row r of batch b is window b of lane r's stream: its documents of epoch
  # 0, 1, ... each followed by EOS, cut with stride seq_len.
  for lane in range(4):
    stream = np.concatenate([
        np.append(np.frombuffer(
            docs[ds.document_index(lane, e, d)].encode(), np.uint8), 0)
        for e in range(6) for d in range(ds.lane_length(lane))])
    for i, b in enumerate(batches):
      window = stream[i * 8:i * 8 + 9]
      np.testing.assert_array_equal(b['inputs'][lane], window[:-1])
      np.testing.assert_array_equal(b['targets'][lane], window[1:])
  # Epochs use different document orders.
  assert ([ds.document_index(0, 0, d) for d in range(6)] !=
          [ds.document_index(0, 1, d) for d in range(6)])


def test_streaming_lanes_cover_documents():
  docs = _documents(20, seed=1)
  ds = DocumentStreamDataset(docs, seq_len=8, batch_size=4, seed=0,
                             tokenizer=ByteTokenizer(), **ONE_HOST)
  # Each lane streams its documents once in eval; all lanes together read
  # every document exactly once.
  order = [ds.document_index(lane, 0, d) for lane in range(4)
           for d in range(ds.lane_length(lane))]
  assert sorted(order) == list(range(20))
  evals = list(ds.eval_batches(30))
  assert evals[-1]['mask'].sum() == 0  # All lanes ran out.
  for lane in range(4):
    stream = np.concatenate(
        [np.append(np.frombuffer(docs[ds.document_index(lane, 0, d)].encode(),
                                 np.uint8), 0)
         for d in range(ds.lane_length(lane))]).astype(np.int32)
    m = np.concatenate([b['mask'][lane] for b in evals]) > 0
    t = np.concatenate([b['targets'][lane] for b in evals])[m]
    np.testing.assert_array_equal(t, stream[1:])


@hypothesis.given(st.integers(1, 3000), st.integers(0, 2**32 - 1))
@hypothesis.settings(max_examples=40, deadline=None)
def test_index_permutation_is_bijection(n, seed):
  perm = IndexPermutation(n, seed)(np.arange(n))
  assert sorted(perm.tolist()) == list(range(n))


def test_state_round_trips_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  ds = DocumentStreamDataset(_documents(8), seq_len=4, batch_size=4,
                             tokenizer=ByteTokenizer(), **ONE_HOST)
  take(ds, 5)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mngr:
    mngr.save(5, args=ocp.args.Composite(
        data=ocp.args.JsonSave(ds.get_state())))
    mngr.wait_until_finished()
    restored = mngr.restore(5, args=ocp.args.Composite(
        data=ocp.args.JsonRestore())).data
  expected = take(ds, 3)
  fresh = DocumentStreamDataset(_documents(8), seq_len=4, batch_size=4,
                                tokenizer=ByteTokenizer(), **ONE_HOST)
  fresh.set_state(restored)
  assert_batches_equal(take(fresh, 3), expected)


def test_set_state_rejects_mismatch(small_text):
  path, _ = small_text
  ds = make_dataset(str(path), seq_len=16, batch_size=8, **ONE_HOST)
  other = make_dataset(str(path), seq_len=8, batch_size=8, **ONE_HOST)
  with pytest.raises(ValueError, match='seq_len'):
    other.set_state(ds.get_state())
  with pytest.raises(ValueError, match='lacks keys'):
    ds.set_state({'epoch': 0})


# ------------------------------------------------------------------- sharding


def _hosts(factory, count, n):
  return concat_hosts([take(factory(p), n) for p in range(count)])


@pytest.mark.parametrize('count', [2, 4])
def test_sharding_in_memory(small_text, count):
  path, _ = small_text
  make = lambda p, c: make_dataset(str(path), seq_len=16, batch_size=8, seed=1,
                                   process_index=p, process_count=c)
  single = take(make(0, 1), 10)  # Crosses an epoch boundary.
  assert_batches_equal(_hosts(lambda p: make(p, count), count, 10), single)
  evals = concat_hosts([list(make(p, count).eval_batches())
                        for p in range(count)])
  assert_batches_equal(evals, list(make(0, 1).eval_batches()))


def test_sharding_synthetic():
  make = lambda p, c: make_dataset('synthetic', seq_len=16, batch_size=8,
                                   process_index=p, process_count=c)
  assert_batches_equal(_hosts(lambda p: make(p, 2), 2, 3), take(make(0, 1), 3))
  assert next(make(1, 2))['inputs'].shape == (4, 16)


def test_sharding_streaming():
  docs = _documents(30, seed=2)
  make = lambda p, c: DocumentStreamDataset(
      docs, seq_len=8, batch_size=6, tokenizer=ByteTokenizer(),
      process_index=p, process_count=c)
  assert_batches_equal(_hosts(lambda p: make(p, 3), 3, 12), take(make(0, 1), 12))
  evals = concat_hosts([list(make(p, 2).eval_batches(5)) for p in range(2)])
  assert_batches_equal(evals, list(make(0, 1).eval_batches(5)))


def test_default_process_is_jax_process(small_text):
  path, _ = small_text
  ds = make_dataset(str(path), seq_len=8, batch_size=4)
  assert (ds.process_index, ds.process_count) == (0, 1)


# ----------------------------------------------------------------------- tfds


def test_tfds_mock_tiny_shakespeare():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    ds = make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=4,
                      **ONE_HOST)
    assert isinstance(ds, TokenArrayDataset)
    b = next(ds)
    check_batch(b, 4, 8)
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
    state = ds.get_state()
    expected = take(ds, 5)
    again = make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=4,
                         **ONE_HOST)
    again.set_state(state)
    assert_batches_equal(take(again, 5), expected)
    streamed = make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=4,
                            streaming=True, **ONE_HOST)
    assert isinstance(streamed, DocumentStreamDataset)
    check_batch(next(streamed), 4, 8)


def test_tfds_exact_documents_and_splits():
  tfds = pytest.importorskip('tensorflow_datasets')
  texts = {'train': ['First doc.', 'Second one!', 'third'],
           'validation': ['held out']}

  def as_data_source(builder, split, **kwargs):
    del builder, kwargs
    return [{'text': t.encode()} for t in texts[split]]

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    train = make_dataset('tfds:tiny_shakespeare', seq_len=4, batch_size=2,
                         **ONE_HOST)
    expected = b'First doc.\0Second one!\0third\0'
    np.testing.assert_array_equal(train.tokens, np.frombuffer(expected, np.uint8))
    val = make_dataset('tfds:tiny_shakespeare', seq_len=4, batch_size=2,
                       split='validation', **ONE_HOST)
    assert val.tokenizer.decode(val.tokens) == 'held out\0'
    with pytest.raises(ValueError, match="'body'"):
      make_dataset('tfds:tiny_shakespeare', seq_len=4, batch_size=2,
                   text_key='body', **ONE_HOST)


def test_tfds_large_split_streams(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(data.TfdsText, '_split_bytes', lambda self: 10**12)
  with tfds.testing.mock_data(num_examples=8):
    ds = make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=4,
                      **ONE_HOST)
    assert isinstance(ds, DocumentStreamDataset)
    small = make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=4,
                         max_in_memory_bytes=None, **ONE_HOST)
    assert isinstance(small, TokenArrayDataset)


def _no_random_access(builder, split, **kwargs):
  del builder, split, kwargs
  raise NotImplementedError('stored as TFRecord')


def test_tfds_tfrecord_without_tensorflow():
  tfds = pytest.importorskip('tensorflow_datasets')
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed')
  with tfds.testing.mock_data(as_data_source_fn=_no_random_access):
    with pytest.raises(ImportError, match='TensorFlow'):
      make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=2,
                   **ONE_HOST)


def test_tfds_tfrecord_with_tensorflow():
  tfds = pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('tensorflow')
  with tfds.testing.mock_data(num_examples=5,
                              as_data_source_fn=_no_random_access):
    ds = make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=2,
                      **ONE_HOST)
    texts = [ex['text'] for ex in
             tfds.as_numpy(tfds.load('tiny_shakespeare', split='train'))]
    assert ds.tokenizer.decode(ds.tokens) == ''.join(
        t.decode() + '\0' for t in texts)
    with pytest.raises(ValueError, match='random access'):
      make_dataset('tfds:tiny_shakespeare', seq_len=8, batch_size=2,
                   streaming=True, **ONE_HOST)


def test_tfds_unknown_dataset():
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(ValueError, match='no_such_dataset_xyz'):
    make_dataset('tfds:no_such_dataset_xyz', seq_len=8, batch_size=4,
                 download=False, **ONE_HOST)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize('source', ['wikitext', 'hf:c4', 'tfds', 'tfds:'])
def test_unknown_source(source):
  with pytest.raises(ValueError, match=repr(source)[1:-1].rstrip(':')):
    make_dataset(source, seq_len=8, batch_size=4, **ONE_HOST)


@pytest.mark.parametrize('source', ['missing_file.txt', 'text:/no/such/file',
                                    '/no/such/dir/*.txt', 'c4/en'])
def test_missing_file(source):
  name = source.removeprefix('text:')
  with pytest.raises(FileNotFoundError, match=name.replace('*', r'\*')):
    make_dataset(source, seq_len=8, batch_size=4, **ONE_HOST)


@pytest.mark.parametrize('source', ['synthetic', 'text'])
def test_indivisible_batch(small_text, source):
  src = str(small_text[0]) if source == 'text' else source
  with pytest.raises(ValueError, match='batch_size=6.*process_count=4'):
    make_dataset(src, seq_len=8, batch_size=6, process_index=0, process_count=4)


def test_other_user_errors(small_text):
  path, _ = small_text
  with pytest.raises(ValueError, match="'test'"):
    make_dataset(str(path), seq_len=8, batch_size=4, split='test', **ONE_HOST)
  with pytest.raises(ValueError, match='seq_len'):
    make_dataset(str(path), seq_len=0, batch_size=4, **ONE_HOST)
  with pytest.raises(ValueError, match='process_index=2'):
    make_dataset(str(path), seq_len=8, batch_size=4, process_index=2,
                 process_count=2)
  with pytest.raises(ValueError, match="tokenizer='byte'"):
    make_dataset('synthetic', seq_len=8, batch_size=4, tokenizer='x.model',
                 **ONE_HOST)
  with pytest.raises(ValueError, match="'depth=2'"):
    make_dataset('synthetic:depth=2', seq_len=8, batch_size=4, **ONE_HOST)
  with pytest.raises(ValueError, match='fewer than batch_size'):
    next(make_dataset(str(path), seq_len=256, batch_size=8, **ONE_HOST))
  with pytest.raises(ValueError, match='fewer than batch_size'):
    DocumentStreamDataset(['a', 'b'], seq_len=4, batch_size=4,
                          tokenizer=ByteTokenizer(), **ONE_HOST)


def test_split_stream_percent_slices():
  tokens = np.arange(1000)
  val = split_stream(tokens, 'validation', 0.1, 'x')
  np.testing.assert_array_equal(val, np.arange(900, 1000))
  np.testing.assert_array_equal(split_stream(tokens, 'validation[50%:]', 0.1, 'x'),
                                np.arange(950, 1000))
  np.testing.assert_array_equal(split_stream(tokens, 'validation[:50%]', 0.1, 'x'),
                                np.arange(900, 950))
  np.testing.assert_array_equal(split_stream(tokens, 'train[10%:20%]', 0.1, 'x'),
                                np.arange(90, 180))
  for bad in ('validation[50%:50%]', 'validation[80%:20%]', 'validation[:101%]', 'test'):
    with pytest.raises(ValueError, match='Split|split'):
      split_stream(tokens, bad, 0.1, 'x')
