"""Hugging Face BERT, watched unchanged: every encoder Linear an entry, spectra equal autograd's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import streamspec
from streamspec.capture import family_of
from streamspec.testing.reference import masked_loss_gradients
from tests.conftest import relative_errors

transformers = pytest.importorskip("transformers")

GROUPS = ["a", "b"]
RANK = 4
BATCH, LENGTH = 6, 7


def small_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config)


def per_sample_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B]`` squared error of the pooled output, over ``B`` (as a mean-reduced loss)."""
    out = model(
        input_ids=batch["ids"], attention_mask=batch["mask"], position_ids=batch["positions"]
    )
    return ((out.pooler_output - batch["target"]) ** 2).sum(-1) / BATCH


def test_bert_spectra_match_masked_loss_autograd() -> None:
    torch.manual_seed(0)
    model = small_bert()
    plain = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    encoder = [n for n in linears if n.startswith("encoder.")]
    assert len(encoder) == 12  # 2 layers × (query, key, value, attention out, intermediate, out)
    compared = [
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.output.dense.weight",
        "encoder.layer.1.attention.self.value.weight",
        "pooler.dense.weight",
    ]
    query = compared[0]
    embeddings_watched = family_of(nn.Embedding(2, 2)) is not None
    problems = streamspec.validate(model)
    assert all("Embedding" in p for p in problems), problems  # at most the embeddings

    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 1, 0, -1, 1])
    exact: dict[str, list[np.ndarray]] = {name: [] for name in [*compared, "activation"]}
    with streamspec.watch(
        model, GROUPS, rank=RANK, live=False, on_unsupported="skip" if problems else "error"
    ) as mon:
        assert set(linears) <= set(mon.layers)
        if embeddings_watched:
            assert "embeddings.word_embeddings.weight" in mon.layers
        for _ in range(2):
            mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
            mask[1, -3:] = 0  # padded samples
            mask[3, -1:] = 0
            batch = {
                "ids": torch.randint(0, 50, (BATCH, LENGTH), generator=gen),
                "mask": mask,
                "target": torch.randn(BATCH, 32, generator=gen),
                # per sample: BERT's default [1, T] position ids are broadcast over the batch, see
                # test_bert_default_position_ids below
                "positions": torch.arange(LENGTH).expand(BATCH, LENGTH),
            }
            reference = small_bert()
            reference.load_state_dict(model.state_dict())
            grads = masked_loss_gradients(
                reference, per_sample_loss(reference, batch), labels, len(GROUPS), names=compared
            )
            with torch.no_grad():
                hidden = reference(
                    input_ids=batch["ids"],
                    attention_mask=batch["mask"],
                    position_ids=batch["positions"],
                    output_hidden_states=True,
                ).hidden_states[0]  # the embeddings' output: layer 0's query input rows
            sigma = np.full((len(GROUPS), RANK), np.nan)
            for name in compared:
                for c in range(len(GROUPS)):
                    g = grads[c][name].double()
                    sigma[c] = torch.linalg.svdvals(g)[:RANK].numpy() / int((labels == c).sum())
                exact[name].append(sigma.copy())
            for c in range(len(GROUPS)):
                rows = hidden[labels == c].reshape(-1, 32).double()
                sigma[c] = torch.linalg.svdvals(rows)[:RANK].numpy() / np.sqrt(
                    int((labels == c).sum())
                )
            exact["activation"].append(sigma.copy())

            mon.label(labels)
            for net, optimizer in ((model, opt), (plain, opt_plain)):
                loss = per_sample_loss(net, batch).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        ds = mon.to_xarray()

    sigma = ds["sigma"]
    for name in compared:
        got = sigma.sel(layer=name, kind="gradient").values
        errors = relative_errors(got, np.stack(exact[name]))
        assert errors.max() <= 1e-2, (name, errors.max())
    got = sigma.sel(layer=query, kind="activation").values
    assert relative_errors(got, np.stack(exact["activation"])).max() <= 1e-2
    assert np.isfinite(sigma.sel(layer=encoder, kind="gradient").values[..., 0]).all()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # watching changed nothing in training


def test_bert_default_position_ids() -> None:
    """BERT's default position ids are ``[1, T]``, shared by the batch: the model is left as it
    is, the position table's steps are NaN (with a warning giving the fix), the other layers
    are recorded. With the fix, ``position_ids`` expanded to the batch, the table is recorded
    per sample and matches autograd of the group-masked loss."""
    torch.manual_seed(0)
    model = small_bert()
    twin = copy.deepcopy(model)
    labels = torch.tensor([0, 1, 1, 0, -1, 1])
    ids = torch.randint(0, 50, (BATCH, LENGTH))
    name = "embeddings.position_embeddings.weight"
    with (
        pytest.warns(streamspec.StreamspecWarning, match="position_ids=torch.arange"),
        streamspec.watch(
            model, GROUPS, rank=RANK, live=False, normalize="sum", on_unsupported="skip"
        ) as mon,
    ):
        mon.label(labels)
        model(input_ids=ids).pooler_output.pow(2).sum().backward()
        twin(input_ids=ids).pooler_output.pow(2).sum().backward()
        ds = mon.to_xarray()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)  # watching changed nothing in training
    query = ds["sigma"].sel(layer="encoder.layer.0.attention.self.query.weight")
    assert np.isfinite(query.values[0, :, :, 0]).all()
    if name not in ds["layer"]:
        return  # embeddings not watched
    assert np.isnan(ds["sigma"].sel(layer=name).values).all()

    positions = torch.arange(LENGTH).expand(BATCH, LENGTH)
    model = small_bert()
    twin = copy.deepcopy(model)
    with streamspec.watch(
        model, GROUPS, rank=RANK, live=False, normalize="sum", on_unsupported="skip"
    ) as mon:
        mon.label(labels)
        model(input_ids=ids, position_ids=positions).pooler_output.pow(2).sum().backward()
        ds = mon.to_xarray()
    per_sample = twin(input_ids=ids, position_ids=positions).pooler_output.pow(2).sum(dim=1)
    reference = masked_loss_gradients(twin, per_sample, labels, len(GROUPS), names=[name])
    got = ds["sigma"].sel(layer=name, kind="gradient").values[0]
    for c in range(len(GROUPS)):
        exact = torch.linalg.svdvals(reference[c][name].double()).numpy()[:RANK]
        assert relative_errors(got[c], exact).max() <= 1e-2
