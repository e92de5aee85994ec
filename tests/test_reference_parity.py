"""Parity with the authors' published CARAT code (github.com/chengzju/CARAT at 3210086), on numbers saved from it.

``tests/data/carat-reference/`` holds three golden files made by running the authors' code (its README says how,
what every key means and which tolerances suffice): an aligned case (a), an unaligned case with their soft
aligner at 50 slots (b) and an aligned case with real padding masks (c). Each holds the authors' parameters under
their names, the inputs, the prototypes and queue, and everything that came out: intermediates, logits,
probabilities, predicted labels, every loss term and the total, every gradient, and the memory after the step
(a and b). Nothing of the authors' code is in carat or here; the files are numbers.

carat in reference mode (:data:`~carat.model.config.REFERENCE_MODEL` / :data:`~carat.model.config.REFERENCE_LOSS`:
every positive weight 1, prototype temperature 1, the LSTM aligner or, for the aligned cases, none, max fusion,
the reference score rule, reconstruction targets not detached) loads their parameters through the explicit
name table :data:`NAME_TABLE` and must reproduce every stored quantity within the README's tolerances. The
mutation tests below show that the comparison has teeth: one perturbed weight, one flipped mask rule, one
changed loss weight or one carat option off the reference makes it fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

import carat.model.carat as carat_module
from carat.model import CARAT, CaratLoss, LossConfig, ModelConfig
from carat.model.config import REFERENCE_LOSS, REFERENCE_MODEL
from carat.model.losses import contrastive_class_ids, weighted_mse

REFERENCE_DIR = Path(__file__).parent / "data" / "carat-reference"
CASES = {"a": "case_a_aligned.npz", "b": "case_b_unaligned.npz", "c": "case_c_aligned_masked.npz"}
MODALITIES = ("text", "visual", "audio")

# ------------------------------------------------------------------------------------------ the name table
PER_MODALITY: tuple[tuple[str, str], ...] = (
    ("{m}_norm.norm2d.weight", "{m}_norm.weight"),
    ("{m}_norm.norm2d.bias", "{m}_norm.bias"),
    ("{m}.embeddings.word_embeddings.weight", "{m}_encoder.embedding.frame_projection.weight"),
    ("{m}.embeddings.word_embeddings.bias", "{m}_encoder.embedding.frame_projection.bias"),
    ("{m}.embeddings.position_embeddings.weight", "{m}_encoder.embedding.position_embedding.weight"),
    ("{m}.embeddings.LayerNorm.weight", "{m}_encoder.embedding.layer_norm.weight"),
    ("{m}.embeddings.LayerNorm.bias", "{m}_encoder.embedding.layer_norm.bias"),
    ("{m}.pooler.dense.weight", "{m}_encoder.pooler.dense.weight"),
    ("{m}.pooler.dense.bias", "{m}_encoder.pooler.dense.bias"),
    ("{m}_attention.attention.weight", "{m}_attention.scores.weight"),
    ("{m}_clf_weight", "classifiers.{m}_weight"),
    ("proj_{m}.linear.0.weight", "{m}_proj.hidden.weight"),
    ("proj_{m}.linear.0.bias", "{m}_proj.hidden.bias"),
    ("proj_{m}.output.weight", "{m}_proj.output.weight"),
    ("proj_{m}.output.bias", "{m}_proj.output.bias"),
    ("de_proj_{m}.linear.0.weight", "{m}_deproj.hidden.weight"),
    ("de_proj_{m}.linear.0.bias", "{m}_deproj.hidden.bias"),
    ("de_proj_{m}.output.weight", "{m}_deproj.output.weight"),
    ("de_proj_{m}.output.bias", "{m}_deproj.output.bias"),
)
"""Authors' name -> carat's, for each modality m."""

PER_LAYER: tuple[tuple[str, str], ...] = tuple(
    (f"{{m}}.encoder.layer.{{i}}.{theirs}.{p}", f"{{m}}_encoder.layers.{{i}}.{ours}.{p}")
    for theirs, ours in (
        ("attention.self.query", "attention.self_attention.query"),
        ("attention.self.key", "attention.self_attention.key"),
        ("attention.self.value", "attention.self_attention.value"),
        ("attention.output.dense", "attention.dense"),
        ("attention.output.LayerNorm", "attention.layer_norm"),
        ("intermediate.dense", "feed_forward.intermediate"),
        ("output.dense", "feed_forward.output"),
        ("output.LayerNorm", "feed_forward.layer_norm"),
    )
    for p in ("weight", "bias")
)
"""Authors' name -> carat's, for each encoder layer i of modality m (BERT's layout -> carat's blocks)."""

LSTM_TENSORS: tuple[str, ...] = tuple(f"{kind}_{part}_l{layer}" for layer in (0, 1) for kind in ("weight", "bias")
                                      for part in ("ih", "hh"))
ALIGNER: tuple[tuple[str, str], ...] = tuple(
    (f"{theirs}_ctc.pred_output_position_inclu_blank.{t}", f"{ours}_align.lstm.{t}")
    for theirs, ours in (("v2t", "visual"), ("a2t", "audio")) for t in LSTM_TENSORS
)
"""The soft aligners' LSTMs (the authors' ``CTCModule``: v2t_ctc aligns visual, a2t_ctc audio). Unaligned mode only."""

SHARED: tuple[tuple[str, str], ...] = (
    ("tv2a.output.weight", "reconstruct.tv2a.weight"),
    ("tv2a.output.bias", "reconstruct.tv2a.bias"),
    ("ta2v.output.weight", "reconstruct.ta2v.weight"),
    ("ta2v.output.bias", "reconstruct.ta2v.bias"),
    ("va2t.output.weight", "reconstruct.va2t.weight"),
    ("va2t.output.bias", "reconstruct.va2t.bias"),
    ("agg.linear.0.weight", "agg.hidden.weight"),
    ("agg.linear.0.bias", "agg.hidden.bias"),
    ("agg.output.weight", "agg.output.weight"),
    ("agg.output.bias", "agg.output.bias"),
)

PROTOTYPES: tuple[tuple[str, str], ...] = (
    ("{m}_pos_protos", "{m}_protos.pos_protos"),
    ("{m}_neg_protos", "{m}_protos.neg_protos"),
)
"""Authors' prototype buffers -> carat's. Their queue (``queue`` [Q, z], ``queue_label`` [Q, 1] float class ids,
``queue_ptr`` [1]) maps to ``queue.features``, ``queue.ids`` (long) and ``queue.ptr`` (a scalar)."""


def name_table(layers: dict[str, int], aligned: bool) -> dict[str, str]:
    """Every parameter of the authors' model at these layer counts -> carat's name for it."""
    table = {theirs.format(m=m): ours.format(m=m) for m in MODALITIES for theirs, ours in PER_MODALITY}
    table.update({theirs.format(m=m, i=i): ours.format(m=m, i=i) for m in MODALITIES for i in range(layers[m])
                  for theirs, ours in PER_LAYER})
    table.update(SHARED)
    if not aligned:
        table.update(ALIGNER)
    return table


class NameMapError(AssertionError):
    """An authors' tensor without a carat counterpart, a carat tensor without one of theirs, or a shape mismatch."""


def load_reference_state(model: CARAT, params: dict[str, np.ndarray], buffers: dict[str, np.ndarray],
                         table: dict[str, str]) -> None:
    """Copy the authors' parameters and memory into ``model`` through ``table``; every tensor on both sides
    must be named exactly once and have the same shape."""
    ours = dict(model.named_parameters())
    unmapped = sorted(set(params) - set(table))
    if unmapped:
        raise NameMapError(f"authors' parameters without a carat name: {unmapped}")
    missing = sorted(set(table) - set(params))
    if missing:
        raise NameMapError(f"the table names authors' parameters the file lacks: {missing}")
    targets = [table[name] for name in params]
    unknown = sorted(set(targets) - set(ours))
    if unknown:
        raise NameMapError(f"the table maps to names carat's model lacks: {unknown}")
    uncovered = sorted(set(ours) - set(targets))
    if uncovered or len(set(targets)) != len(targets):
        raise NameMapError(f"carat parameters no authors' tensor fills: {uncovered} (or one filled twice)")
    for name, value in params.items():
        target = ours[table[name]]
        if tuple(target.shape) != value.shape:
            raise NameMapError(f"{name} {value.shape} -> {table[name]} {tuple(target.shape)}: shapes differ")
    with torch.no_grad():
        for name, value in params.items():
            ours[table[name]].copy_(torch.from_numpy(value))
        for m in MODALITIES:
            for theirs, mine in PROTOTYPES:
                model.get_buffer(mine.format(m=m)).copy_(torch.from_numpy(buffers[theirs.format(m=m)]))
        ids = buffers["queue_label"][:, 0]
        if not np.array_equal(ids, np.round(ids)):
            raise NameMapError("queue_label holds non-integer class ids (the authors' initial noise queue?)")
        model.queue.features.copy_(torch.from_numpy(buffers["queue"]))
        model.queue.ids.copy_(torch.from_numpy(ids.astype(np.int64)))
        model.queue.ptr.fill_(int(buffers["queue_ptr"][0]))


# --------------------------------------------------------------------------------------------- the golden files
@dataclass
class Golden:
    """One golden file, read."""

    name: str
    data: dict[str, np.ndarray]
    config: dict

    @property
    def aligned(self) -> bool:
        return bool(self.config["aligned"])

    @property
    def has_training(self) -> bool:
        return "loss/total" in self.data

    def family(self, prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in self.data.items() if k.startswith(prefix)}


_GOLDEN: dict[str, Golden] = {}


def golden(case: str) -> Golden:
    if case not in _GOLDEN:
        with np.load(REFERENCE_DIR / CASES[case]) as z:
            data = {k: z[k] for k in z.files}
        _GOLDEN[case] = Golden(case, data, json.loads(str(data["config_json"])))
    return _GOLDEN[case]


def reference_configs(g: Golden, model_changes: dict | None = None,
                      loss_changes: dict | None = None) -> tuple[ModelConfig, LossConfig]:
    """carat's configs for the file's configuration in reference mode (plus ``*_changes``, for mutations)."""
    c = g.config
    model = {
        "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"], "num_heads": c["num_heads"],
        "hidden_act": "gelu", "layer_norm_eps": c["layer_norm_eps"], "projection_size": c["proj_size"],
        "queue_size": c["queue_size"], "prototype_momentum": c["proto_m"], "threshold": c["threshold"],
        **{f"{m}_dim": c["feature_dims"][m] for m in MODALITIES},
        **{f"{m}_layers": c["layers"][m] for m in MODALITIES},
        **{f"{m}_max_positions": c["max_positions"][m] for m in MODALITIES},
        **{f"{m}_dropout": c["hidden_dropout"] for m in MODALITIES},
        **REFERENCE_MODEL,
    }
    model.update({"aligner": "none", "ctc_target_length": None} if g.aligned
                 else {"aligner": "lstm", "ctc_target_length": c["ctc_length"]})
    loss = {**REFERENCE_LOSS, **c["loss_weights"], "final_clf_weight": c["final_clf_weight"],
            "temperature": c["supcon_temperature"], "base_temperature": c["supcon_base_temperature"]}
    assert c["attention_dropout"] == c["hidden_dropout"] == 0.0 and c["num_classes"] == 6
    model.update(model_changes or {})
    loss.update(loss_changes or {})
    return ModelConfig(**model), LossConfig(**loss)


def inputs_of(g: Golden) -> dict[str, torch.Tensor]:
    """carat's inputs: the frames and their real-frame masks (bool). In case b the authors' visual/audio masks
    are all-ones slot masks [B, 50]; carat takes the frame masks and makes its own slot masks (all real here)."""
    out = {}
    for m in MODALITIES:
        out[m] = torch.from_numpy(g.data[f"input/{m}"])
        out[f"{m}_mask"] = torch.from_numpy(g.data[f"input/{m}_frame_mask"])
    return out


def build_model(g: Golden, model_cfg: ModelConfig) -> CARAT:
    torch.manual_seed(0)  # every value is overwritten; the seed only keeps construction deterministic
    model = CARAT.from_config(model_cfg)
    load_reference_state(model, g.family("param/"), g.family("buffer/"),
                         name_table(g.config["layers"], g.aligned))
    return model


_MODELS: dict[tuple[str, str], tuple[CARAT, dict[str, torch.Tensor]]] = {}


def loaded_model(g: Golden, model_cfg: ModelConfig) -> CARAT:
    """:func:`build_model`, built once per case and configuration and reset to the file's state on every call
    (the mutation tests run many comparisons)."""
    key = (g.name, repr(model_cfg))
    if key not in _MODELS:
        model = build_model(g, model_cfg)
        _MODELS[key] = model, {k: v.clone() for k, v in model.state_dict().items()}
    model, state = _MODELS[key]
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return model


# ----------------------------------------------------------------------------------------------- recording
@dataclass
class Recorder:
    """Forward hooks that keep carat's intermediates under the golden files' names."""

    calls: dict[str, list] = field(default_factory=dict)
    """Module key -> its outputs, in call order (de_proj_m: e_m then the stand-in; classifiers: Z, FRR, SRR, r)."""

    @contextmanager
    def attached(self, model: CARAT) -> Iterator["Recorder"]:
        handles = []

        def keep(key: str) -> Callable:
            def hook(_module, _inputs, output):
                self.calls.setdefault(key, []).append(output)
            return hook

        for m in MODALITIES:
            for part in ("norm", "encoder", "deproj"):
                handles.append(getattr(model, f"{m}_{part}").register_forward_hook(keep(f"{m}_{part}")))
        for m in ("visual", "audio"):
            align = getattr(model, f"{m}_align")
            handles.append(align.register_forward_hook(keep(f"{m}_align")))
            if hasattr(align, "lstm"):
                handles.append(align.lstm.register_forward_hook(keep(f"{m}_lstm")))
        handles.append(model.classifiers.register_forward_hook(keep("classifiers")))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _padded_lstm_output(output) -> torch.Tensor:
    sequence = output[0]
    if isinstance(sequence, PackedSequence):
        sequence, _ = pad_packed_sequence(sequence, batch_first=True)
    return sequence


def carat_values(model: CARAT, out, rec: Recorder, mode: str, aligned: bool) -> dict[str, torch.Tensor]:
    """carat's outputs under the golden files' keys for one forward (``mode`` "eval" or "train")."""
    v: dict[str, torch.Tensor] = {}
    for i, m in enumerate(MODALITIES):
        if mode == "eval":
            v[f"eval/norm/{m}"] = rec.calls[f"{m}_norm"][0]
            hidden, pooled = rec.calls[f"{m}_encoder"][0]
            v[f"eval/encoder/{m}"], v[f"eval/pooled/{m}"] = hidden, pooled
        v[f"{mode}/Z/{m}"] = out.label_features[:, i]
        v[f"{mode}/latent/{m}"] = out.latent[:, i]
        v[f"{mode}/recon/{m}"] = out.recon[:, i]
        recon, stand_in = rec.calls[f"{m}_deproj"][:2]  # de_proj_m decodes e_m, then the prototype stand-in
        assert torch.equal(recon, out.recon[:, i])
        v[f"{mode}/stand_in/{m}"] = stand_in
        v[f"{mode}/frr/{m}"] = out.frr[:, i]
        v[f"{mode}/srr/{m}"] = out.srr[:, i]
    if mode == "eval" and not aligned:
        for m in ("visual", "audio"):
            v[f"eval/aligned/{m}"] = rec.calls[f"{m}_align"][0][0]
            v[f"eval/align_logits/{m}"] = _padded_lstm_output(rec.calls[f"{m}_lstm"][0])
    per_modality = rec.calls["classifiers"][:3]  # on Z, FRR, SRR ([B, 3, C]; the authors' are [B, C, 3])
    for key, logits, fused in zip(("out1_lsr", "out3_frr", "out4_srr"), per_modality,
                                  (out.lsr_logits, out.frr_logits, out.srr_logits)):
        v[f"{mode}/logits/{key}_per_modality"] = logits.transpose(1, 2)
        v[f"{mode}/logits/{key}"] = fused
    v[f"{mode}/logits/agg"] = out.agg_logits
    v[f"{mode}/scores"] = model.scores(out)
    v[f"{mode}/pred_labels"] = model.predict(out).float()
    return v


# ---------------------------------------------------------------------------------------------- comparing
EXACT = ("pred_labels", "contrast/ids", "shuffle_targets", "after/queue_label", "after/queue_ptr")
"""Keys compared exactly (the README's "Exact" list)."""


def error_ratio(key: str, ours: torch.Tensor | np.ndarray, theirs: np.ndarray, real: np.ndarray | None = None) -> float:
    """max|ours - theirs| over the README's tolerance for ``key`` (<= 1 passes); ``real`` [B, L] restricts an
    encoder output to real positions."""
    a = np.asarray(ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"{key}: carat's shape {a.shape}, the authors' {b.shape}")
    if real is not None:
        a, b = a[real], b[real]
    if any(key.endswith(e) for e in EXACT):
        return 0.0 if np.array_equal(a, b) else float("inf")
    if not np.isfinite(a).all():
        return float("inf")
    tolerance = 2e-5 + 2e-5 * np.abs(b).max()
    return float(np.abs(a - b).max() / tolerance)


def gradient_ratios(model: CARAT, g: Golden, table: dict[str, str]) -> dict[str, float]:
    """Per gradient tensor, max|diff| / (1e-4 max|theirs|); the analytically-zero pairs (attention key biases)
    agree when both are below 1e-6 of the case's largest gradient entry."""
    ours = dict(model.named_parameters())
    theirs = g.family("grad/")
    none = set(g.data["grad_none"].tolist())
    largest = max(np.abs(v).max() for v in theirs.values())
    ratios = {}
    for name, target in table.items():
        grad = ours[target].grad
        if name in none:
            ratios[f"grad/{name}"] = 0.0 if grad is None or not grad.abs().any() else float("inf")
            continue
        if grad is None:
            ratios[f"grad/{name}"] = float("inf")
            continue
        a, b = grad.detach().double().numpy(), theirs[name].astype(np.float64)
        diff = np.abs(a - b).max()
        if np.abs(b).max() < 1e-6 * largest:
            ratios[f"grad/{name}"] = 0.0 if np.abs(a).max() < 1e-6 * largest else float("inf")
        else:
            ratios[f"grad/{name}"] = float(diff / (1e-4 * np.abs(b).max()))
    return ratios


def golden_shuffle(g: Golden) -> Callable:
    """carat's ``shuffle_indices`` replaced by the authors' draws of this file."""
    sample = torch.from_numpy(g.data["shuffle/sample_index"])
    modality = torch.from_numpy(g.data["shuffle/modality_index"])

    def indices(batch, num_classes, device, real=None):
        assert (batch, 3, num_classes) == tuple(sample.shape)
        return sample.to(device), modality.to(device)
    return indices


@dataclass
class Mutation:
    """A change to carat's side of the comparison (the tests below show that each one is caught)."""

    model: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    after_load: Callable[[CARAT], None] | None = None
    patches: tuple[tuple[object, str, object], ...] = ()
    masks: Callable[[dict], dict] | None = None


def compare_case(case: str, mutation: Mutation | None = None, *, train: bool = True,
                 monkeypatch: pytest.MonkeyPatch | None = None) -> dict[str, float]:
    """Run carat on a golden file (eval forward, then, where the file has one, the training forward, backward
    and memory update) and return every compared key's error over its tolerance."""
    mutation = mutation or Mutation()
    g = golden(case)
    model_cfg, loss_cfg = reference_configs(g, mutation.model, mutation.loss)
    model = loaded_model(g, model_cfg)
    if mutation.after_load is not None:
        mutation.after_load(model)
    table = name_table(g.config["layers"], g.aligned)
    inputs = inputs_of(g)
    if mutation.masks is not None:
        inputs = mutation.masks(inputs)
    ratios: dict[str, float] = {}
    with pytest.MonkeyPatch.context() as mp:
        for target, attribute, value in mutation.patches:
            mp.setattr(target, attribute, value)
        if g.has_training:
            mp.setattr(carat_module, "shuffle_indices", golden_shuffle(g))
        model.eval()
        with torch.no_grad(), Recorder().attached(model) as rec:
            out = model(**inputs)
            values = carat_values(model, out, rec, "eval", g.aligned)
        ratios.update(_compare_values(g, values, inputs))
        if train and g.has_training:
            ratios.update(_compare_training(g, model, loss_cfg, model_cfg, inputs, table))
    return ratios


def _compare_values(g: Golden, values: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    ratios = {}
    for key, value in values.items():
        real = None
        if key.startswith("eval/encoder/"):
            m = key.rsplit("/", 1)[1]
            # Padded positions' rows are queries from padded frames, which influence nothing (README).
            real = inputs[f"{m}_mask"].numpy() if value.shape[1] == inputs[f"{m}_mask"].shape[1] else None
        ratios[key] = error_ratio(key, value, g.data[key], real)
    return ratios


def _compare_training(g: Golden, model: CARAT, loss_cfg: LossConfig, model_cfg: ModelConfig,
                      inputs: dict[str, torch.Tensor], table: dict[str, str]) -> dict[str, float]:
    labels = torch.from_numpy(g.data["input/labels"])
    loss_fn = CaratLoss.from_config(loss_cfg, model_cfg)
    model.train()
    model.zero_grad(set_to_none=True)
    with Recorder().attached(model) as rec:
        out = model(**inputs)
        values = carat_values(model, out, rec, "train", g.aligned)
    terms = loss_fn(model, out, labels)
    terms["total"].backward()
    batch, stages, classes, size = out.contrast_features.shape
    index = out.shuffle_sample_index
    values.update({
        "train/logits/agg_shuffled": out.shuffled_agg_logits,
        "train/shuffle_targets": labels[index, torch.arange(classes)[None, None, :]],
        "train/contrast/rows": torch.nn.functional.normalize(out.contrast_features, dim=-1).reshape(-1, size),
        "train/contrast/ids": contrastive_class_ids(labels, stages).reshape(-1),
    })
    for name in ("lsr_clf", "aug_clf", "final_clf", "supcon", "recon_mse", "aug_mse", "beta_mse", "total_aug_clf",
                 "shuffle_aug_clf", "total"):
        values[f"loss/{name}"] = terms[name]
    ones = torch.ones(batch)
    for stack, term in (("recon", "recon_mse"), ("frr", "aug_mse"), ("srr", "beta_mse")):
        for i, m in enumerate(MODALITIES):
            values[f"loss/{term}_{m}"] = weighted_mse(getattr(out, stack)[:, i], out.label_features[:, i], ones)
    ratios = _compare_values(g, values, inputs)
    ratios.update(gradient_ratios(model, g, table))
    model.update_memory(out, labels)
    after = g.family("after/")
    for m in MODALITIES:
        for theirs, mine in PROTOTYPES:
            key = theirs.format(m=m)
            ratios[f"after/{key}"] = error_ratio(f"after/{key}", model.get_buffer(mine.format(m=m)), after[key])
    ratios["after/queue"] = error_ratio("after/queue", model.queue.features, after["queue"])
    ratios["after/queue_label"] = error_ratio("after/queue_label", model.queue.ids[:, None], after["queue_label"])
    ratios["after/queue_ptr"] = error_ratio("after/queue_ptr", model.queue.ptr.reshape(1), after["queue_ptr"])
    return ratios


def worst(ratios: dict[str, float]) -> tuple[str, float]:
    key = max(ratios, key=ratios.get)
    return key, ratios[key]


def failures(ratios: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in ratios.items() if not v <= 1.0}


# ------------------------------------------------------------------------------------------------- the tests
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as the golden files were made: these tensors are small, and beside other jobs on a
    shared machine several threads per op made the module 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_carat_in_reference_mode_reproduces_the_authors_numbers(case):
    ratios = compare_case(case)
    g = golden(case)
    expected = {k for k in g.data if k.split("/")[0] in ("eval", "train", "loss", "after", "grad")}
    assert expected <= set(ratios), f"not compared: {sorted(expected - set(ratios))}"
    assert not failures(ratios), f"case {case}: beyond tolerance (error / tolerance): {failures(ratios)}"
    key, ratio = worst(ratios)
    print(f"case {case}: {len(ratios)} quantities, worst {key} at {ratio:.3f} of its tolerance")


def test_the_name_table_covers_both_models_exactly():
    for case in sorted(CASES):
        g = golden(case)
        table = name_table(g.config["layers"], g.aligned)
        assert set(table) == set(g.family("param/")), case
        model = CARAT.from_config(reference_configs(g)[0])
        assert sorted(table.values()) == sorted(n for n, _ in model.named_parameters()), case


def test_an_unmapped_or_misshaped_tensor_fails():
    g = golden("a")
    model = CARAT.from_config(reference_configs(g)[0])
    table = name_table(g.config["layers"], g.aligned)
    params, buffers = g.family("param/"), g.family("buffer/")
    with pytest.raises(NameMapError, match="without a carat name"):
        load_reference_state(model, {**params, "text.extra.weight": np.zeros(3, np.float32)}, buffers, table)
    shrunk = {**params, "agg.output.bias": params["agg.output.bias"][:-1]}
    with pytest.raises(NameMapError, match="shapes differ"):
        load_reference_state(model, shrunk, buffers, table)
    partial = {k: v for k, v in table.items() if k != "tv2a.output.bias"}
    with pytest.raises(NameMapError):
        load_reference_state(model, {k: v for k, v in params.items() if k != "tv2a.output.bias"}, buffers, partial)
    swapped = {**table, "tv2a.output.bias": "reconstruct.ta2v.bias"}
    with pytest.raises(NameMapError, match="no authors' tensor fills"):
        load_reference_state(model, params, buffers, swapped)


def test_carat_draws_its_shuffle_in_the_authors_layout():
    # The golden indices are injected above; the authors' raw draws (numpy permutations in their loop order)
    # must give the same indices under the layout carat's shuffle_indices documents: sample[b, m, c] =
    # perm_{c,m}(b), modality[b, m, c] = perm'_{c,b}(m).
    g = golden("b")
    batch, classes = g.data["input/labels"].shape
    sample = np.empty((batch, 3, classes), np.int64)
    modality = np.empty((batch, 3, classes), np.int64)
    rng = np.random.RandomState(int(g.data["perm/numpy_seed"]))
    for k in range(3 * classes):
        drawn = rng.permutation(batch)
        assert np.array_equal(drawn, g.data[f"perm/{k}"])
        sample[:, k % 3, k // 3] = drawn
    for j in range(classes * batch):
        drawn = rng.permutation(3)
        assert np.array_equal(drawn, g.data[f"perm/{3 * classes + j}"])
        modality[j % batch, :, j // batch] = drawn
    assert np.array_equal(sample, g.data["shuffle/sample_index"])
    assert np.array_equal(modality, g.data["shuffle/modality_index"])


# ----------------------------------------------------------------------------------------------- mutations
def _perturb(name: str, scale: float = 1e-3) -> Callable[[CARAT], None]:
    def apply(model: CARAT) -> None:
        tensor = dict(model.named_parameters()).get(name)
        tensor = model.get_buffer(name) if tensor is None else tensor
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            tensor.add_(scale * torch.randn(tensor.shape, generator=g))
    return apply


def _key_bias(name: str) -> bool:
    return ".attention.self_attention.key.bias" in name


def one_tensor_per_role() -> list[tuple[str, str]]:
    """(case, carat name): one tensor for every row of the name table (its modality rotating over the rows, layer
    0), the aligner LSTMs' from the unaligned case, the rest from aligned case a (whose visual and audio steps
    are distinct frames: case b's 50 aligned slots are near copies of each other, which hides the queries)."""
    picks = [("a", ours.format(m=MODALITIES[i % 3])) for i, (_, ours) in enumerate(PER_MODALITY)]
    picks += [("a", ours.format(m=MODALITIES[i % 3], i=0)) for i, (_, ours) in enumerate(PER_LAYER)
              if not _key_bias(ours)]
    picks += [("a", ours) for _, ours in SHARED]
    picks += [("b", f"visual_align.lstm.{t}") for t in LSTM_TENSORS if "_ih_" in t]
    picks += [("b", f"audio_align.lstm.{t}") for t in LSTM_TENSORS if "_hh_" in t]
    picks += [("a", "text_protos.pos_protos"), ("a", "audio_protos.neg_protos")]
    return picks


def test_a_perturbed_weight_or_prototype_is_caught():
    # The eval forward alone must notice 1e-3 N(0, 1) on any one tensor, except the attention key biases: a
    # constant per query added to every key score is invisible to the softmax (their gradient is zero too).
    missed = [(case, name) for case, name in one_tensor_per_role()
              if not failures(compare_case(case, Mutation(after_load=_perturb(name)), train=False))]
    assert not missed, f"perturbations the comparison did not notice: {missed}"


def test_a_perturbed_key_bias_changes_nothing():
    # The README's exception, shown rather than assumed: 0.1 N(0, 1) on a key bias leaves every output in tolerance.
    ratios = compare_case("c", Mutation(after_load=_perturb("text_encoder.layers.0.attention.self_attention.key.bias",
                                                            0.1)))
    assert not failures(ratios)


def _ignore_padding_in_encoders(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device)


def _label_attention_without_mask(original: Callable) -> Callable:
    def attend(self, hidden, mask):
        return original(self, hidden, torch.ones_like(mask))
    return attend


def _all_frames_real(inputs: dict) -> dict:
    return {k: torch.ones_like(v) if k.endswith("_mask") else v for k, v in inputs.items()}


def _no_queue_rows(queue) -> torch.Tensor:
    return torch.zeros_like(queue.ids, dtype=torch.bool)


@pytest.mark.parametrize("rule", ["encoder padding", "label-attention padding", "no masks", "queue rows"])
def test_a_flipped_mask_rule_is_caught(rule):
    from carat.model import attention, heads, memory

    mutation = {
        "encoder padding": Mutation(patches=((attention, "padding_bias", _ignore_padding_in_encoders),)),
        "label-attention padding": Mutation(patches=((heads.LabelAttention, "forward",
                                                      _label_attention_without_mask(heads.LabelAttention.forward)),)),
        "no masks": Mutation(masks=_all_frames_real),
        # carat's own initial queue rows are left out of SupCon; the authors' filled rows are anchors and contrast
        "queue rows": Mutation(patches=((memory.ContrastiveQueue, "filled", _no_queue_rows),)),
    }[rule]
    case = "a" if rule == "queue rows" else "c"
    bad = failures(compare_case(case, mutation))
    assert bad, f"flipping the {rule} rule went unnoticed"
    if rule == "queue rows":
        assert "loss/supcon" in bad and not any(k.startswith("eval/") for k in bad)


LOSS_WEIGHTS = ("lsr_clf_weight", "aug_clf_weight", "final_clf_weight", "cl_weight", "recon_mse_weight",
                "aug_mse_weight", "beta_mse_weight", "total_aug_clf_weight", "shuffle_aug_clf_weight")


@pytest.mark.parametrize("weight", LOSS_WEIGHTS)
def test_a_changed_loss_weight_is_caught(weight):
    g = golden("a")
    current = g.config["loss_weights"].get(weight, g.config["final_clf_weight"])
    bad = failures(compare_case("a", Mutation(loss={weight: current * 1.05})))
    assert "loss/total" in bad and any(k.startswith("grad/") for k in bad), sorted(bad)
    assert not any(k.startswith(("eval/", "train/")) for k in bad)


@pytest.mark.parametrize("change", [
    {"loss": {"pos_weight": (1.0, 1.1, 1.2, 2.5, 1.3, 3.0)}},
    {"loss": {"detach_recon_targets": True}},
    {"loss": {"recon_clf_weight": 0.1}},
    {"model": {"prototype_temperature": 0.5}},
    {"model": {"modality_fusion": "sum"}},
    {"model": {"score_rule": "with_lsr"}},
    {"model": {"input_dropout": 0.3}},
], ids=lambda change: next(iter(next(iter(change.values())))))
def test_each_carat_option_off_the_reference_is_caught(change):
    bad = failures(compare_case("b", Mutation(**change)))
    assert bad, f"{change} left every quantity within tolerance"


def _supcon_reference_sum(features: np.ndarray, ids: np.ndarray, anchors: int, temperature: float) -> float:
    """The README's SupCon formula, written out in float64: the sum over the first ``anchors`` rows (the rest
    are contrast rows only here) of -mean_{p in P(i)} [s_ip / T - log sum_{a != i} exp(s_ia / T)], 0 without
    positives; ids < 0 match nothing."""
    sims = features @ features.T / temperature
    total = 0.0
    for i in range(anchors):
        others = np.arange(len(features)) != i
        positives = others & (ids == ids[i]) & (ids[i] >= 0)
        if positives.any():
            log_denominator = np.log(np.exp(sims[i, others]).sum())
            total -= (sims[i, positives] - log_denominator).mean()
    return total


def test_the_reference_noise_queue_scales_the_first_supcon_by_batch_over_batch_plus_queue():
    # model.queue_init="noise" (the reference's initial queue, README quirk 1): column-normalised noise rows that
    # match no class are contrast rows and anchors without positives, so SupCon is the batch anchors' sum over
    # n + Q rows, i.e. the batch's value times n / (n + Q) (x0.30 at the seed's 3,456 batch rows and 8,192 queue).
    from carat.model.losses import supcon_loss
    from carat.model.memory import ContrastiveQueue

    g = golden("a")
    rows = torch.from_numpy(g.data["train/contrast/rows"])
    ids = torch.from_numpy(g.data["train/contrast/ids"])
    torch.manual_seed(0)
    queue = ContrastiveQueue(300, rows.shape[1], "noise")
    norms = queue.features.norm(dim=1)
    assert torch.allclose(queue.features.norm(dim=0), torch.ones(rows.shape[1]))  # columns, not rows
    assert abs(float(norms.pow(2).mean()) - rows.shape[1] / 300) < 1e-5
    features = torch.cat([rows, queue.features])
    all_ids = torch.cat([ids, queue.ids])
    value = supcon_loss(features, all_ids, queue.filled().new_ones(len(features)), 0.07, 0.07)
    expected = _supcon_reference_sum(features.double().numpy(), all_ids.numpy(), len(rows), 0.07) / len(features)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    carat_init = ContrastiveQueue(300, rows.shape[1], "empty")
    batch_only = supcon_loss(torch.cat([rows, carat_init.features]), torch.cat([ids, carat_init.ids]),
                             torch.cat([torch.ones(len(rows), dtype=torch.bool), carat_init.filled()]), 0.07, 0.07)
    assert float(batch_only) == pytest.approx(
        _supcon_reference_sum(rows.double().numpy(), ids.numpy(), len(rows), 0.07) / len(rows), rel=1e-5)
    assert 3456 / (3456 + 8192) == pytest.approx(0.30, abs=0.005)
