"""CTC model: step() streaming equals forward(), batching is invisible, lengths are right."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from asr.audio import load_audio
from asr.features import log_mel
from asr.model import CTCModel, ModelConfig, output_lengths


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Frame-by-frame stepping is dominated by per-call overhead, which extra threads only add to."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(bidirectional: bool, cell: str = "gru", seed: int = 0, subsampling: int = 4) -> CTCModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(bidirectional=bidirectional, cell=cell, hidden_size=32, num_layers=2,
                      conv_channels=8, dropout=0.1, subsampling=subsampling)
    return CTCModel(cfg).eval()


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    """(T, F) roughly normalised log-mel of real speech, T odd (exercises ceil lengths)."""
    f = log_mel(load_audio(SAMPLES / "9302-1-0000.flac"))
    f = (f - f.mean()) / f.std()
    return f[: f.shape[0] - (1 - f.shape[0] % 2)]


def chained(model: CTCModel, x: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    state = model.init_state()
    bounds = [0, *cuts, x.shape[0]]
    out = []
    with torch.no_grad():
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            lp, state = model.step(x[None, a:b], state)
            out.append(lp[0])
    return torch.cat(out)


@pytest.mark.parametrize("cell,subsampling", [("gru", 4), ("lstm", 4), ("rnn", 4), ("gru", 2)])
def test_step_chained_over_any_split_equals_forward(feats, cell, subsampling):
    model = small(bidirectional=False, cell=cell, subsampling=subsampling)
    with torch.no_grad():
        full, n_out = model(feats[None], torch.tensor([feats.shape[0]]))
    full = full[0, : n_out[0]]
    rng = np.random.default_rng(1)
    splits = [[], list(range(1, feats.shape[0])),  # whole, then one frame at a time
              list(range(4, feats.shape[0], 4)), list(range(7, feats.shape[0], 7))]
    splits += [sorted(rng.choice(np.arange(1, feats.shape[0]), 12, replace=False).tolist())
               for _ in range(3)]
    for cuts in splits:
        got = chained(model, feats, cuts)
        assert got.shape == full.shape
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_step_chained_equals_forward_in_bfloat16(feats, cell):
    """The hidden state travels between chunks in the recurrent layers' precision."""
    model = small(bidirectional=False, cell=cell).set_precision("bfloat16")
    with torch.no_grad():
        full, n_out = model(feats[None], torch.tensor([feats.shape[0]]))
        _, state = model.step(feats[None, :9], model.init_state())
    assert state.hidden.dtype == torch.bfloat16 and full.dtype == torch.float32
    full = full[0, : n_out[0]]
    for cuts in ([], list(range(1, feats.shape[0])), list(range(5, feats.shape[0], 5))):
        torch.testing.assert_close(chained(model, feats, cuts), full, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bfloat16_changes_the_output_only_by_rounding(feats, bidirectional):
    ref, half = small(bidirectional), small(bidirectional).set_precision("bfloat16")
    assert (ref.precision, half.precision) == ("float32", "bfloat16")
    assert small(bidirectional).half().precision == "float16"
    assert half.classifier.weight.dtype == half.conv1.weight.dtype == torch.float32
    with torch.no_grad():
        a, _ = ref(feats[None], torch.tensor([feats.shape[0]]))
        b, _ = half(feats[None], torch.tensor([feats.shape[0]]))
    diff = (a - b).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.005
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.98


def test_set_precision_refuses_unknown_names_and_training():
    with pytest.raises(ValueError, match="unknown precision 'float8'"):
        small(bidirectional=False).set_precision("float8")
    with pytest.raises(RuntimeError, match="inference"):
        small(bidirectional=False).train().set_precision("bfloat16")


def test_step_does_not_modify_the_state_it_is_given(feats):
    model = small(bidirectional=False)
    s0 = model.init_state()
    with torch.no_grad():
        a, s1 = model.step(feats[None, :40], s0)
        b, _ = model.step(feats[None, :40], s0)  # same input from the same state: same output
    torch.testing.assert_close(a, b)
    assert not torch.equal(s1.hidden, s0.hidden)


def test_step_with_no_frames_changes_nothing(feats):
    model = small(bidirectional=False)
    with torch.no_grad():
        lp, state = model.step(feats[None, :0], model.init_state())
    assert lp.shape == (1, 0, model.cfg.vocab_size)
    torch.testing.assert_close(chained(model, feats, [0, 0, 13]), chained(model, feats, []))
    assert torch.equal(state.hidden, model.init_state().hidden)


def test_bidirectional_model_refuses_to_stream(feats):
    model = small(bidirectional=True)
    with pytest.raises(RuntimeError, match="cannot stream"):
        model.init_state()
    uni_state = small(bidirectional=False).init_state()
    with pytest.raises(RuntimeError, match="cannot stream"):
        model.step(feats[None, :10], uni_state)


def test_step_needs_eval_mode(feats):
    model = small(bidirectional=False).train()
    with pytest.raises(AssertionError, match="eval"):
        model.step(feats[None, :10], model.init_state())


@pytest.mark.parametrize("cell,subsampling", [("gru", 4), ("lstm", 4), ("rnn", 4), ("gru", 2)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padded_batch_equals_each_utterance_alone(feats, bidirectional, cell, subsampling):
    model = small(bidirectional, cell, subsampling=subsampling)
    lengths = [feats.shape[0], 57, 30, 9]
    batch = torch.zeros(len(lengths), max(lengths), feats.shape[1])
    for i, n in enumerate(lengths):
        batch[i, :n] = feats[i * 3: i * 3 + n] if n < feats.shape[0] else feats
    with torch.no_grad():
        lp, n_out = model(batch, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            alone, n1 = model(batch[i: i + 1, :n], torch.tensor([n]))
            assert n_out[i] == n1[0]
            torch.testing.assert_close(lp[i, : n_out[i]], alone[0, : n1[0]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padded_recurrence_equals_the_packed_one(bidirectional, cell):
    """The CPU's padded recurrence (reversing each sequence for the backward direction) computes
    what packing the batch for the module computes (the CUDA path), outputs and gradients."""
    torch.manual_seed(1)
    model = CTCModel(ModelConfig(bidirectional=bidirectional, cell=cell, hidden_size=16, num_layers=3,
                                 dropout=0.0)).train()
    z = torch.randn(4, 23, 16, requires_grad=True)
    lengths = torch.tensor([23, 11, 1, 0])
    valid = (torch.arange(23)[None, :] < lengths[:, None])[..., None]
    weights = torch.randn(1, 23, 2 * 16 if bidirectional else 16)
    outs, grads = [], []
    for recur in (model._recur, model._recur_packed):
        h = recur(z, lengths) * valid
        outs.append(h)
        grads.append(torch.autograd.grad((h * weights).sum(), [z, *model.rnn.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_batch_gradients_are_the_sum_of_each_utterance_alone(feats, bidirectional):
    """Training on a padded batch learns exactly what the utterances would teach one by one:
    padding never leaks into a gradient (the reverse direction starts at each utterance's end)."""
    model = small(bidirectional)
    lengths = [feats.shape[0], 41, 12]
    batch = torch.zeros(len(lengths), max(lengths), feats.shape[1])
    for i, n in enumerate(lengths):
        batch[i, :n] = feats[i * 5: i * 5 + n] if n < feats.shape[0] else feats
    weights = torch.linspace(-1, 1, model.cfg.vocab_size)

    def loss(x, n):
        lp, n_out = model(x, torch.tensor(n))
        valid = torch.arange(lp.shape[1])[None, :] < n_out[:, None]
        return (lp * weights * valid[..., None]).sum()

    together = torch.autograd.grad(loss(batch, lengths), list(model.parameters()))
    alone = [torch.autograd.grad(loss(batch[i: i + 1, :n], [n]), list(model.parameters()))
             for i, n in enumerate(lengths)]
    for g, *gs in zip(together, *alone, strict=True):
        torch.testing.assert_close(g, sum(gs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("subsampling", [4, 2])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_output_shapes_and_log_probabilities(feats, bidirectional, subsampling):
    model = small(bidirectional, subsampling=subsampling)
    with torch.no_grad():
        lp, n_out = model(feats[None], torch.tensor([feats.shape[0]]))
    n = -(-feats.shape[0] // subsampling)
    assert lp.dtype == torch.float32
    assert lp.shape == (1, n, model.cfg.vocab_size)
    assert n_out.tolist() == [n]
    assert output_lengths(torch.tensor([feats.shape[0]]), subsampling).tolist() == [n]
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:2]))


@pytest.mark.parametrize("n,expected", [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (100, 25), (101, 26)])
def test_output_lengths_are_ceil_of_a_quarter(n, expected):
    assert output_lengths(torch.tensor([n])).tolist() == [expected]


@pytest.mark.parametrize("subsampling", [4, 2])
def test_causal_model_ignores_the_future(feats, subsampling):
    """Output frame j of the streaming model depends on input frames up to S*j + S - 1 only."""
    model = small(bidirectional=False, subsampling=subsampling)
    changed = feats.clone()
    changed[40:] = torch.randn_like(changed[40:])
    first_changed = 40 // subsampling
    with torch.no_grad():
        a, _ = model(feats[None], torch.tensor([feats.shape[0]]))
        b, _ = model(changed[None], torch.tensor([feats.shape[0]]))
    torch.testing.assert_close(a[0, :first_changed], b[0, :first_changed])
    assert not torch.allclose(a[0, first_changed:], b[0, first_changed:])


def test_subsampling_changes_no_weight_shape():
    """--init-from may move a model between 40 and 20 ms output frames: the same state dict loads."""
    four, two = small(False, subsampling=4), small(False, subsampling=2)
    two.load_state_dict(four.state_dict())
    with pytest.raises(ValueError, match="subsampling 3"):
        CTCModel(ModelConfig(subsampling=3))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lstm_starts_with_forget_gate_bias_one(bidirectional):
    """Each LSTM layer's forget gate starts open (biases summing to 1), the other gates as PyTorch draws them."""
    model = CTCModel(ModelConfig(cell="lstm", hidden_size=16, num_layers=2, bidirectional=bidirectional))
    h = 16
    biases = dict(model.rnn.named_parameters())
    suffixes = [f"l{i}{d}" for i in range(2) for d in (["", "_reverse"] if bidirectional else [""])]
    for sfx in suffixes:
        b_ih, b_hh = biases[f"bias_ih_{sfx}"].detach(), biases[f"bias_hh_{sfx}"].detach()
        torch.testing.assert_close(b_ih[h:2 * h] + b_hh[h:2 * h], torch.ones(h))
        for gate in (0, 2, 3):  # input, cell, output: PyTorch's uniform init, not constants
            assert b_ih[gate * h:(gate + 1) * h].std() > 0.01
    gru = CTCModel(ModelConfig(cell="gru", hidden_size=16, num_layers=2))
    assert gru.rnn.bias_ih_l0.detach()[h:2 * h].std() > 0.01  # only the LSTM gets the constant


def test_unknown_cell_is_refused():
    with pytest.raises(ValueError, match="unknown cell 'transformer'"):
        CTCModel(ModelConfig(cell="transformer"))
