"""CTC acoustic model: convolutional subsampler + stacked recurrent layers, one module for both directions.

Shapes: B batch, T input frames (10 ms), T' = ceil(T / S) output frames (S = subsampling 4: 40 ms, or
2: 20 ms; both convolutions halve frequency, the second halves time only when S is 4), F mel bins,
V vocabulary size, L recurrent layers, H hidden units per direction, C conv channels.

The unidirectional model is causal end to end: its convolutions pad on the left only, and `step()`
carries the frames each convolution still needs plus the recurrent hidden state in a `StreamState`,
so chaining `step()` over any split of the input equals `forward()` on the whole of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
# one layer in one direction with given weights: what the CELLS modules run inside
_CELL_FUNCTIONS = {"gru": torch.gru, "lstm": torch.lstm, "rnn": torch.rnn_tanh}
KERNEL = 3  # conv kernel along time and frequency
STRIDE = 2  # conv stride along frequency (both layers) and time (first layer; second when subsampling 4)
SUBSAMPLINGS = (2, 4)  # output frame = 20 or 40 ms
# storage and arithmetic of the recurrent layers at inference; everything else stays float32
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    n_mels: int = 80  # input feature bins F
    vocab_size: int = 29  # output classes V, blank at 0
    bidirectional: bool = True  # True: offline BiGRU; False: causal, streamable
    cell: str = "gru"  # recurrent cell: gru | lstm | rnn (Elman, tanh)
    conv_channels: int = 32  # channels C of both subsampling convolutions
    hidden_size: int = 256  # recurrent units H per direction
    num_layers: int = 3  # stacked recurrent layers L
    dropout: float = 0.15  # between recurrent layers and before the classifier
    subsampling: int = 4  # input frames per output frame: 4 (40 ms) or 2 (20 ms); same weight shapes

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def time_strides(self) -> tuple[int, int]:
        """Time stride of each convolution."""
        return STRIDE, self.subsampling // STRIDE


@dataclass(frozen=True)
class StreamState:
    """Everything a causal model needs from the past of a stream (batch dim B kept for stacking)."""

    hidden: Tensor  # (L, B, H) for gru/rnn; (2, L, B, H) for lstm (h and c stacked)
    context: tuple[Tensor, ...]  # per conv layer: (B, C_in, KERNEL - 1 .. , F_in) input frames not yet consumed


def output_lengths(lengths: Tensor, subsampling: int = 4) -> Tensor:
    """Input frame counts -> output frame counts: each convolution's time stride, ceil each time."""
    out = lengths
    for stride in ModelConfig(subsampling=subsampling).time_strides:
        out = output_lengths_one(out, stride)
    return out


class CTCModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.cell not in CELLS:
            raise ValueError(f"unknown cell {cfg.cell!r}; choose one of {', '.join(CELLS)}")
        if cfg.subsampling not in SUBSAMPLINGS:
            raise ValueError(f"subsampling {cfg.subsampling} is not one of {SUBSAMPLINGS}")
        self.cfg = cfg
        c = cfg.conv_channels
        t1, t2 = cfg.time_strides
        # time is padded by hand (causal or centred); frequency by the layer itself
        self.conv1 = nn.Conv2d(1, c, KERNEL, stride=(t1, STRIDE), padding=(0, 1))
        self.conv2 = nn.Conv2d(c, c, KERNEL, stride=(t2, STRIDE), padding=(0, 1))
        f_out = cfg.n_mels
        for _ in range(2):
            f_out = (f_out + 2 - KERNEL) // STRIDE + 1
        self.proj = nn.Linear(c * f_out, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.rnn = CELLS[cfg.cell](
            cfg.hidden_size, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True,
            bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        if cfg.cell == "lstm":
            # forget-gate bias 1 (PyTorch's gate order: input, forget, cell, output), the usual LSTM
            # init: the cell keeps its memory by default while the gates are still untrained
            with torch.no_grad():
                for name, p in self.rnn.named_parameters():
                    if name.startswith("bias_ih"):
                        p[cfg.hidden_size:2 * cfg.hidden_size] = 1.0
                    elif name.startswith("bias_hh"):
                        p[cfg.hidden_size:2 * cfg.hidden_size] = 0.0
        self.dropout = nn.Dropout(cfg.dropout)
        n_dir = 2 if cfg.bidirectional else 1
        self.classifier = nn.Linear(n_dir * cfg.hidden_size, cfg.vocab_size)
        self.lookahead_frames = 0  # the causal model needs no future input frames

    @property
    def time_padding(self) -> tuple[int, int]:
        """(left, right) zero frames around each convolution's time axis."""
        return (KERNEL - 1, 0) if not self.cfg.bidirectional else ((KERNEL - 1) // 2, KERNEL // 2)

    def _project(self, y: Tensor) -> Tensor:
        """(B, C, T', F') conv output -> (B, T', H) recurrent input."""
        b, c, t, f = y.shape
        y = y.permute(0, 2, 1, 3).reshape(b, t, c * f)
        return self.dropout(self.norm(self.proj(y)))

    def _classify(self, h: Tensor) -> Tensor:
        return F.log_softmax(self.classifier(self.dropout(h.float())).float(), dim=-1)

    @property
    def rnn_dtype(self) -> torch.dtype:
        """dtype of the recurrent layers' weights, inputs and hidden state."""
        return self.rnn.weight_hh_l0.dtype

    @property
    def precision(self) -> str:
        """Name of the recurrent layers' dtype: a key of PRECISIONS, or torch's name for another dtype
        (e.g. after model.half())."""
        return next((name for name, d in PRECISIONS.items() if d == self.rnn_dtype),
                    str(self.rnn_dtype).removeprefix("torch."))

    def set_precision(self, precision: str) -> CTCModel:
        """Run the recurrent layers in `precision` (inference only); returns self.

        The recurrent layers are most of the work and, per chunk of a stream, bound by reading their
        weight matrices; bfloat16 halves those reads. Their inputs are cast on the way in and their
        outputs back to float32, so convolutions, projection, classifier and log-softmax stay float32,
        and the streaming state carries the hidden state in the recurrent layers' dtype. Chaining
        step() then equals forward() up to rounding: the float32 layers' last-bit differences
        between chunkings can tip a bfloat16 rounding, which float32 recurrent layers absorb.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "float32" and self.training:
            raise RuntimeError(f"{precision} is for inference: call model.eval() first")
        self.rnn.to(PRECISIONS[precision])
        return self

    def forward(self, feats: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Whole utterances.

        Args:
            feats: (B, T, F) normalised log-mel, zero beyond each length.
            lengths: (B,) int64 valid frames per utterance.
        Returns:
            (B, T', V) float32 log-probabilities and (B,) int64 output lengths.
        """
        assert feats.ndim == 3 and feats.shape[2] == self.cfg.n_mels, tuple(feats.shape)
        lengths = lengths.to(feats.device)
        x = feats.unsqueeze(1)  # (B, 1, T, F)
        cur = lengths
        for conv in (self.conv1, self.conv2):
            x = F.gelu(conv(F.pad(x, (0, 0, *self.time_padding))))
            cur = output_lengths_one(cur, conv.stride[0])
            mask = torch.arange(x.shape[2], device=x.device)[None, :] < cur[:, None]  # (B, T')
            x = x * mask[:, None, :, None]
        z = self._project(x)  # (B, T', H)
        return self._classify(self._recur(z, cur)), cur

    def _recur(self, z: Tensor, lengths: Tensor) -> Tensor:
        """The recurrent layers over padded (B, T', H) input, each sequence seeing only its own frames.

        On the CPU the batch runs padded, with each sequence reversed within its own length for the
        backward direction: a packed RNN's backward pass there zero-fills the whole batch's gradient
        once per time step, which made training steps about 3x slower (measured with
        benchmarks/train_throughput.py --recurrence padded,packed). On CUDA, cuDNN runs packed
        batches natively. Both give the same outputs and gradients (tests/test_model.py); outputs
        beyond a sequence's length are not meaningful (they are never scored).
        """
        z = z.to(self.rnn_dtype)
        if z.is_cuda:
            return self._recur_packed(z, lengths)
        if not self.cfg.bidirectional:
            return self.rnn(z)[0]  # causal: frames past a sequence's end never reach its own
        t = torch.arange(z.shape[1], device=z.device)[None, :]
        ends = lengths[:, None]
        flip = torch.where(t < ends, ends - 1 - t, t)[:, :, None]  # reverses each sequence in place
        x = z
        for layer in range(self.cfg.num_layers):
            if layer:
                x = F.dropout(x, self.cfg.dropout, self.training)
            ahead = self._direction(x, layer, "")
            back = self._direction(x.gather(1, flip.expand_as(x)), layer, "_reverse")
            x = torch.cat([ahead, back.gather(1, flip.expand_as(back))], dim=2)
        return x

    def _recur_packed(self, z: Tensor, lengths: Tensor) -> Tensor:
        """The same as _recur, by packing the batch for self.rnn (the CUDA path)."""
        packed = nn.utils.rnn.pack_padded_sequence(
            z, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.rnn(packed)
        return nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=z.shape[1])[0]

    def _direction(self, x: Tensor, layer: int, suffix: str) -> Tensor:
        """One layer of self.rnn in one direction (suffix "" or "_reverse") over (B, T', D) input."""
        weights = [getattr(self.rnn, f"{name}_l{layer}{suffix}")
                   for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h0 = x.new_zeros(1, x.shape[0], self.cfg.hidden_size)
        hx = (h0, h0) if self.cfg.cell == "lstm" else h0
        return _CELL_FUNCTIONS[self.cfg.cell](x, hx, weights, True, 1, 0.0, self.training, False, True)[0]

    def init_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> StreamState:
        """The state before any audio: zero hidden state and the convolutions' left padding."""
        if self.cfg.bidirectional:
            raise RuntimeError("a bidirectional model cannot stream; use a unidirectional (gru) model")
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, cfg.hidden_size)
        hidden = torch.zeros((2, *shape) if cfg.cell == "lstm" else shape, device=device,
                             dtype=self.rnn_dtype)
        f1 = (cfg.n_mels + 2 - KERNEL) // STRIDE + 1
        ctx = (torch.zeros(batch_size, 1, KERNEL - 1, cfg.n_mels, device=device),
               torch.zeros(batch_size, cfg.conv_channels, KERNEL - 1, f1, device=device))
        return StreamState(hidden=hidden, context=ctx)

    def step(self, feats: Tensor, state: StreamState) -> tuple[Tensor, StreamState]:
        """Continue a stream with new frames (eval mode, causal model only).

        Args:
            feats: (B, T_new, F) normalised log-mel frames following those already stepped; T_new may be 0.
            state: from init_state() or the previous step(); not modified.
        Returns:
            (B, T'_new, V) log-probabilities of the output frames that became complete, and the new state.
        """
        if self.cfg.bidirectional:
            raise RuntimeError("a bidirectional model cannot stream; use a unidirectional (gru) model")
        assert not self.training, "step() is for inference: call model.eval() first"
        assert feats.ndim == 3 and feats.shape[2] == self.cfg.n_mels, tuple(feats.shape)
        x = feats.unsqueeze(1)  # (B, 1, T_new, F)
        new_ctx = []
        for conv, ctx in zip((self.conv1, self.conv2), state.context, strict=True):
            buf = torch.cat([ctx, x], dim=2)  # (B, C_in, K + T_new, F_in)
            stride = conv.stride[0]
            n_out = max(0, (buf.shape[2] - KERNEL) // stride + 1)
            new_ctx.append(buf[:, :, stride * n_out:])
            if n_out == 0:
                x = buf.new_zeros(buf.shape[0], conv.out_channels, 0, _conv_f(buf.shape[3]))
            else:
                x = F.gelu(conv(buf[:, :, : stride * (n_out - 1) + KERNEL]))
        if x.shape[2] == 0:
            empty = x.new_zeros(x.shape[0], 0, self.cfg.vocab_size)
            return empty, StreamState(hidden=state.hidden, context=tuple(new_ctx))
        z, prev = self._project(x).to(self.rnn_dtype), state.hidden.to(self.rnn_dtype)
        if self.cfg.cell == "lstm":
            h, (hn, cn) = self.rnn(z, (prev[0], prev[1]))
            hidden = torch.stack([hn, cn])
        else:
            h, hidden = self.rnn(z, prev)
        return self._classify(h), StreamState(hidden=hidden, context=tuple(new_ctx))


def output_lengths_one(lengths: Tensor, stride: int = STRIDE) -> Tensor:
    """Frame counts after one convolution of this time stride (ceil)."""
    return torch.div(lengths + stride - 1, stride, rounding_mode="floor")


def _conv_f(f_in: int) -> int:
    return (f_in + 2 - KERNEL) // STRIDE + 1


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
