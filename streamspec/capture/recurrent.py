"""``nn.RNN`` (tanh/relu), ``nn.LSTM``, ``nn.GRU``: fused modules, watched through stepwise twins.

The fused kernels show neither the time steps nor the gate pre-activations, so ``watch()``
replaces each module, in place, by a *twin*: an instance of a subclass of the module's own class
holding the same attributes and the very same ``Parameter`` objects (optimizers, ``state_dict``
keys and ``isinstance`` checks are untouched). While gradients are enabled the twin runs the
recurrence one time step at a time, with PyTorch's equations and gate orders, and hands every
weight product to the monitor; under ``torch.no_grad()`` it runs the fused kernel.

Rows are stacked over time steps, the "dimension of tying" of Baker, Calhoun & Plis (2024), so that
``Σ_t Δ_tᵀ A_t`` is each weight's gradient (``G`` = 1, 4, 3 gates for RNN, LSTM, GRU):

* ``weight_ih_l{k}``: activations ``x_t`` ``[B, T, h_in]`` (one product for all steps), adjoints
  ``∂L/∂(x_t W_ihᵀ)`` ``[B, T, G·H]``: the gate pre-activation gradients.
* ``weight_hh_l{k}``: activations ``h_{t−1}`` ``[B, T, H]`` (``h_{−1} = h0``, zeros by default),
  one product for all steps, delivered after the recurrence; adjoints ``∂L/∂(h_{t−1} W_hhᵀ)``: the
  gate pre-activation gradients for RNN and LSTM, read off the input projection's gradient (both
  products enter the gates only through their sum); for GRU's ``n`` block ``r_t ⊙ ∂L/∂n̂_t``
  (the reset gate multiplies the product's output). One capture per time step where the input
  projection has no gradient (input and ``W_ih`` both frozen).
* ``weight_hr_l{k}`` (LSTM with ``proj_size > 0``): activations ``o_t ⊙ tanh(c_t)`` ``[B, 1, H]``,
  adjoints ``∂L/∂h_t``.

``_reverse`` variants likewise, over the reversed sequence. Unbatched ``[T, h_in]`` inputs are a
batch of one sample. Packed sequences are refused (pad them); inter-layer dropout uses
``F.dropout``, so only ``dropout=0`` matches the fused module exactly.
"""

from __future__ import annotations

import copyreg
from typing import Any, SupportsIndex

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from streamspec.capture.registry import (
    Capture,
    DenseSource,
    Sink,
    Site,
    qualified,
    register,
    report,
)
from streamspec.errors import StreamspecError


def _time_major(g: torch.Tensor) -> torch.Tensor:
    """``[T, B, w]`` gradient of a product over all steps → ``[B, T, w]`` samples first."""
    return g.transpose(0, 1)


def _records(sink: Any) -> bool:
    """Whether ``sink`` records the current step (a sink without ``recording()``: always)."""
    recording = getattr(sink, "recording", None)
    return True if recording is None else bool(recording())


def _gru_hh_adjoint(resets: torch.Tensor) -> Any:
    """GRU ``W_hh``'s adjoints from the gradient of the input projection ``[T, B, 3H]``: the
    ``r`` and ``z`` blocks as they are, the ``n`` block times the reset gate ``r_t`` (``resets``
    ``[T, B, H]``), as ``n_t = tanh(i_n + r_t ⊙ h_n)``; samples first."""

    def adjoint(g: torch.Tensor) -> torch.Tensor:
        cut = 2 * resets.shape[-1]
        return torch.cat([g[..., :cut], g[..., cut:] * resets], dim=-1).transpose(0, 1)

    return adjoint


def _one_position(g: torch.Tensor) -> torch.Tensor:
    """``[B, w]`` gradient of one step's product → ``[B, 1, w]``."""
    return g.unsqueeze(1)


class _Stepwise(nn.RNNBase):
    """Mixed in before the original's class (see :func:`_twin_class`); never instantiated alone.

    Instance state beyond the original's ``__dict__`` (set through ``__dict__``, so nothing is
    registered as a submodule): ``_streamspec_original`` (the module replaced) and
    ``_streamspec_sinks`` (``(sink, module)`` pairs; ``module`` None means this twin).
    """

    _streamspec_base: type[nn.RNNBase]  # the original's class, set per twin class

    @property
    def training(self) -> bool:
        # One flag for twin and original, so model.train()/eval() during watch survives close().
        return bool(self.__dict__["_streamspec_original"].training)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_streamspec_original"].training = mode

    def forward(self, input: Any, hx: Any = None) -> Any:
        watched = {
            name
            for name in self._flat_weights_names
            if name.startswith("weight_") and getattr(self, name).requires_grad
        }
        if not torch.is_grad_enabled() or not watched:
            return super().forward(input, hx)  # nothing to record: the fused kernel
        if isinstance(input, PackedSequence):
            raise StreamspecError.build(
                f"a padded tensor input to the watched {type(self).__name__} (streamspec runs it "
                "step by step to see every time step's weight products)",
                "a PackedSequence, which is not supported",
                "pass the padded batch instead (torch.nn.utils.rnn.pad_packed_sequence), "
                "or run this module under torch.no_grad()",
            )
        if not any(_records(sink) for sink, _ in self.__dict__["_streamspec_sinks"]):
            return self._fused_forward(input, hx, watched)
        return self._stepwise_forward(input, hx, watched)

    def _fused_forward(self, input: torch.Tensor, hx: Any, watched: set[str]) -> Any:
        """A step no monitor records (``every > 1``): the fused kernel, as fast as the plain
        module. The monitors still see the call (one capture, its output's gradient only counts
        the step, and the batch size is checked as on recorded steps)."""
        result = super().forward(input, hx)
        output = result[0]
        if output.requires_grad:
            x = input if input.dim() == 3 else input.unsqueeze(0 if self.batch_first else 1)
            rows = DenseSource(x.detach() if self.batch_first else x.detach().transpose(0, 1))
            key = min(watched)
            self._deliver([Capture(key, rows, output, _time_major)])
        return result

    def __reduce_ex__(self, protocol: SupportsIndex) -> str | tuple[Any, ...]:
        # deepcopy and pickle (torch.save(model)) yield a plain, unwatched module of the original
        # class: a monitor cannot be copied, and a class made at run time cannot be pickled.
        base = type(self)._streamspec_base
        plain = base.__new__(base)
        plain.__dict__.update(
            {k: v for k, v in self.__dict__.items() if not k.startswith("_streamspec")}
        )
        plain.__dict__["training"] = self.training
        # What object.__reduce_ex__ gives for protocols 0-1; the 2+ form insists on type(self).
        rebuild = copyreg._reconstructor  # type: ignore[attr-defined]
        return rebuild, (base, object, None), plain.__getstate__()

    # -- the recurrence ------------------------------------------------------------------------

    def _deliver(self, captures: list[Capture]) -> None:
        report(self, self.__dict__["_streamspec_sinks"], captures)

    def _stepwise_forward(
        self, input: torch.Tensor, hx: Any, watched: set[str]
    ) -> tuple[torch.Tensor, Any]:
        lstm = self.mode == "LSTM"
        name = type(self).__name__
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if not batched:  # one sample
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if lstm else hx.unsqueeze(1)
        x = input.transpose(0, 1) if self.batch_first else input  # [T, B, h_in]
        batch = x.shape[1]
        directions = 2 if self.bidirectional else 1
        states = self.num_layers * directions
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = x.new_zeros(states, batch, out_size)
            c0 = x.new_zeros(states, batch, self.hidden_size) if lstm else None
        elif lstm:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        given: Any = (h0, c0) if lstm else h0
        self.check_forward_args(input, given, None)  # PyTorch's own messages

        layer_input = x
        h_n: list[torch.Tensor] = []
        c_n: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                i = layer * directions + direction
                out, h, c = self._direction(
                    layer_input,
                    h0[i],
                    None if c0 is None else c0[i],
                    f"_l{layer}{'_reverse' if direction else ''}",
                    reverse=direction == 1,
                    watched=watched,
                )
                outputs.append(out)
                h_n.append(h)
                if c is not None:
                    c_n.append(c)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)

        output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        hidden = torch.stack(h_n)
        cell = torch.stack(c_n) if lstm else None
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = hidden.squeeze(1)
            cell = None if cell is None else cell.squeeze(1)
        return output, ((hidden, cell) if lstm else hidden)

    def _direction(
        self,
        x: torch.Tensor,
        h: torch.Tensor,
        c: torch.Tensor | None,
        suffix: str,
        *,
        reverse: bool,
        watched: set[str],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer, one direction: ``x [T, B, h_in]`` → outputs ``[T, B, H]``, last ``h``, ``c``.

        The captured outputs are the products plus their bias: the bias leaves the gradient
        (the adjoint) unchanged and saves an addition.
        """
        w_ih = getattr(self, f"weight_ih{suffix}")
        w_hh = getattr(self, f"weight_hh{suffix}")
        b_ih = getattr(self, f"bias_ih{suffix}") if self.bias else None
        b_hh = getattr(self, f"bias_hh{suffix}") if self.bias else None
        w_hr = getattr(self, f"weight_hr{suffix}") if self.proj_size > 0 else None
        key_ih, key_hh, key_hr = f"weight_ih{suffix}", f"weight_hh{suffix}", f"weight_hr{suffix}"

        gi = F.linear(x, w_ih, b_ih)  # [T, B, G·H], every step at once
        # One view per time step: unbind's backward stacks the T gradients once, where indexing
        # ``gi[t]`` makes each step's backward zero-fill and add a whole [T, B, G·H] tensor
        # (quadratic in T: a watched LSTM over 200 steps trained 3.5× slower on a CPU).
        gi_steps = gi.unbind(0)
        if key_ih in watched:
            rows = DenseSource(x.detach().transpose(0, 1))
            self._deliver([Capture(key_ih, rows, gi, _time_major)])

        mode = self.mode
        # W_hh's products of all steps in one capture, delivered after the recurrence: its rows
        # are the states h_{t−1} (known once it has run) and its adjoints come from gi's
        # gradient, the gate pre-activation gradients (gi and W_hh's product enter the gates only
        # through their sum; GRU's n block is then scaled by r_t). One hook and one gather per
        # step instead of one per time step. Without a gradient for gi (x and W_ih both frozen),
        # one capture per time step.
        all_steps = key_hh in watched and gi.requires_grad
        resets: list[torch.Tensor] = []
        h_init = h
        outputs: list[torch.Tensor] = [x] * x.shape[0]  # placeholders, all overwritten
        order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        for t in order:
            gh = F.linear(h, w_hh, b_hh)  # [B, G·H]
            if key_hh in watched and not all_steps:
                self._deliver(
                    [Capture(key_hh, DenseSource(h.detach().unsqueeze(1)), gh, _one_position)]
                )
            if mode == "LSTM":
                assert c is not None
                i, f, g, o = (gi_steps[t] + gh).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                m = torch.sigmoid(o) * torch.tanh(c)
                if w_hr is None:
                    h = m
                else:
                    h = F.linear(m, w_hr)  # [B, proj_size]
                    if key_hr in watched:
                        rows = DenseSource(m.detach().unsqueeze(1))
                        self._deliver([Capture(key_hr, rows, h, _one_position)])
            elif mode == "GRU":
                i_r, i_z, i_n = gi_steps[t].chunk(3, -1)
                h_r, h_z, h_n = gh.chunk(3, -1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                if all_steps:
                    resets.append(r.detach())  # in the order of ``order``
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
            elif mode == "RNN_TANH":
                h = torch.tanh(gi_steps[t] + gh)
            else:  # RNN_RELU
                h = torch.relu(gi_steps[t] + gh)
            outputs[t] = h
        out = torch.stack(outputs)
        if all_steps:
            states = out.detach()
            first = h_init.detach().unsqueeze(0)
            # the state each step read: h_{t−1} (h_{t+1} in reverse), the initial one first
            prev = torch.cat([states[1:], first]) if reverse else torch.cat([first, states[:-1]])
            adjoint = _time_major
            if mode == "GRU":
                adjoint = _gru_hh_adjoint(torch.stack(resets[::-1] if reverse else resets))
            self._deliver([Capture(key_hh, DenseSource(prev.transpose(0, 1)), gi, adjoint)])
        return out, h, c


_TWIN_CLASSES: dict[type[nn.Module], type[_Stepwise]] = {}


def _twin_class(cls: type[nn.Module]) -> type[_Stepwise]:
    """The stepwise subclass of ``cls`` (cached; a twin's own class is reused)."""
    if issubclass(cls, _Stepwise):
        return cls
    twin = _TWIN_CLASSES.get(cls)
    if twin is None:
        # Same name, so the model prints as before.
        twin = type(cls.__name__, (_Stepwise, cls), {"_streamspec_base": cls})
        _TWIN_CLASSES[cls] = twin
    return twin


@register
class RecurrentFamily:
    """One site per weight matrix and direction; rows stacked over time steps (module docstring)."""

    module_types = (nn.RNN, nn.LSTM, nn.GRU)
    stepwise = True
    tying = True  # rows stack time steps: watch(..., tied=True) applies

    @staticmethod
    def sites(module: nn.Module, prefix: str) -> list[Site]:
        assert isinstance(module, nn.RNNBase)
        sites = []
        for key in module._flat_weights_names:
            weight = module._parameters.get(key)
            if not key.startswith("weight_") or weight is None or not weight.requires_grad:
                continue
            name = qualified(prefix, key)
            sites.append(Site(name, module, key, int(weight.shape[1]), int(weight.shape[0])))
        return sites

    @staticmethod
    def capture(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, batch_dim: int
    ) -> list[Capture]:
        return []  # stepwise: the twin reports its own products

    @staticmethod
    def problems(module: nn.Module) -> list[str]:
        if parametrize.is_parametrized(module):
            return [
                "parametrized weights (torch.nn.utils.parametrize) are not supported; "
                "remove the parametrization to watch this module"
            ]
        return []

    @staticmethod
    def make_stepwise(module: nn.Module, sink: Sink, *, parent: nn.Module, name: str) -> nn.Module:
        """A twin of ``module``: same attributes and Parameter objects, its own hook dicts.

        ``module`` itself is left untouched. Watching an already watched module (two monitors)
        twins the twin, so both monitors keep receiving their rows.
        """
        cls = _twin_class(type(module))
        twin = cls.__new__(cls)
        state = dict(module.__dict__)
        state.pop("training", None)  # a property of the twin: the original's flag
        for key, value in state.items():
            # Hook dicts, submodules, buffers: copies, so user hooks still fire but nothing
            # added to one module leaks into the other. Parameters and _flat_weights stay shared.
            if key.startswith("_") and key not in ("_parameters", "_flat_weights"):
                if isinstance(value, dict):
                    state[key] = type(value)(value)
                elif isinstance(value, set):
                    state[key] = set(value)
        state["_streamspec_original"] = module
        inherited = module.__dict__.get("_streamspec_sinks", [])
        state["_streamspec_sinks"] = [(s, module if m is None else m) for s, m in inherited] + [
            (sink, None)
        ]
        twin.__dict__.update(state)
        return twin
