"""Sparse fine-tuning (unipeft.methods.sparse, unipeft.methods.fisher): FishMask and diff pruning.

The shared invariants of the shipped recipes (before ``prepare``/pruning) run in tests/core/test_invariants.py; here
they run again on the states that matter — FishMask after ``prepare`` and diff pruning after pruning — together with
the Fisher scores against a brute-force computation, the global top-k budget, sparse storage (file size grows with k),
parity with HF peft's SHiRA on the same mask, and a real SST-2 batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import ShiraConfig, get_peft_model

import unipeft
from unipeft.core.recipe import DeltaSpec, Recipe
from unipeft.core.site import DeltaSite
from unipeft.methods import sparse
from unipeft.methods.fisher import budget, compute_fisher_mask, global_top_k
from unipeft.methods.sparse import DiffPruneConfig, FishMaskConfig, SparseDelta

FAMILIES = ("bert", "gpt2", "llama", "t5")
POSITIONS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")


def _fishmask(**form) -> Recipe:
    return Recipe(name="fishmask", family="selective",
                  deltas=(DeltaSpec(form=FishMaskConfig(**form), positions=POSITIONS),))


def _diff(**form) -> Recipe:
    return Recipe(name="diff_pruning", family="selective",
                  deltas=(DeltaSpec(form=DiffPruneConfig(**form), positions=POSITIONS),))


def _batches(tiny, family: str, n: int = 3) -> list[dict[str, torch.Tensor]]:
    return [tiny.batch(family, seed=s) for s in range(n)]


def _candidates(peft) -> int:
    return sum(p.form.d_out * p.form.d_in for _, p in peft.delta_modules())


def _prepared(tiny, family: str, **form):
    model = tiny.model(family)
    peft = unipeft.attach(model, _fishmask(**form))
    sparse.prepare(peft, _batches(tiny, family))
    return model, peft


# ------------------------------------------------------------------------------------------------- the delta
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_forward_is_the_scattered_dense_delta(tiny, randomize, family):
    model, peft = _prepared(tiny, family)
    randomize(peft)
    for _, placed in peft.delta_modules():
        form = placed.form
        assert isinstance(form, SparseDelta) and form.chosen == "fisher"
        dense = torch.zeros(form.d_out * form.d_in)
        dense[form.indices] = form.values.detach()
        assert torch.equal(form.delta_weight().detach(), dense.view(form.d_out, form.d_in))
        x = torch.randn(2, 3, form.d_in)
        torch.testing.assert_close(form(x), x @ dense.view(form.d_out, form.d_in).T)


def test_sparse_delta_matches_hf_shira_on_the_same_mask(tiny):
    """SHiRA (HF peft) trains a fixed sparse mask too: with its random mask and values copied over, outputs and
    trainable counts agree."""
    theirs = tiny.model("llama")
    ours = copy.deepcopy(theirs)
    config = ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=3)
    hf = get_peft_model(theirs, config)
    peft = unipeft.attach(ours, Recipe(name="s", family="selective",
                                       deltas=(DeltaSpec(form=FishMaskConfig(), positions=("attn.q", "attn.v")),)))
    g = torch.Generator().manual_seed(0)
    for module, placed in peft.delta_modules():
        layer = hf.base_model.model.get_submodule(module)
        rows, cols = layer.shira_indices["default"].long()
        with torch.no_grad():
            layer.shira_weight["default"].copy_(torch.randn(rows.numel(), generator=g))
        placed.form.set_entries_(rows * placed.form.d_in + cols, layer.shira_weight["default"], chosen="fisher")
    peft.set_active("default")
    assert hf.get_nb_trainable_parameters()[0] == peft.summary().trainable
    batch = tiny.batch("llama")
    torch.testing.assert_close(tiny.logits(ours, batch), tiny.logits(hf, batch), atol=1e-5, rtol=0)


def test_scatter_and_merge_work_on_strided_weights(tiny, randomize):
    """GPT-2's Conv1D weight is (in, out) and attn.q/k/v are row slices of c_attn: merge writes through the views."""
    model, peft = _prepared(tiny, "gpt2")
    randomize(peft)
    batch = tiny.batch("gpt2")
    unmerged = tiny.logits(model, batch)
    peft.merge()
    torch.testing.assert_close(tiny.logits(model, batch), unmerged, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- Fisher
def test_fisher_scores_match_brute_force(tiny):
    model = tiny.model("bert")
    batches = _batches(tiny, "bert", 2)
    masks = compute_fisher_mask(model, batches, ["attn.q", "ffn.down"], k=40)
    names = sorted(masks)
    assert len(names) == 4  # query and output.dense of both layers
    params = [dict(model.named_modules())[n].weight for n in names]
    for p in model.parameters():
        p.requires_grad_(True)
    fisher = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, params)
        for f, g in zip(fisher, grads):
            f += g ** 2 / len(batches)
    threshold = torch.cat([f.reshape(-1) for f in fisher]).topk(40).values.min()
    assert sum(int(m.sum()) for m in masks.values()) == 40
    for name, f in zip(names, fisher):
        assert torch.equal(masks[name], f >= threshold), name


def test_compute_fisher_mask_restores_flags_and_grads(tiny):
    model = tiny.model("llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks = compute_fisher_mask(model, _batches(tiny, "llama", 1), k=0.1)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)


def test_fused_projection_masks_cover_only_the_chosen_slices(tiny):
    masks = compute_fisher_mask(tiny.model("gpt2"), _batches(tiny, "gpt2", 1), ["attn.v"], k=1.0)
    for name, mask in masks.items():
        width = mask.shape[0] // 3
        assert not mask[:2 * width].any() and mask[2 * width:].all(), name


def test_budget_and_global_top_k():
    assert budget(0.25, 100) == 25 and budget(7, 100) == 7
    for bad in (0.0, 1.5, 101, -1, True, "3"):
        with pytest.raises(ValueError):
            budget(bad, 100)
    a, b = torch.tensor([[0.1, 5.0], [3.0, 0.2]]), torch.tensor([4.0, 0.0, 6.0])
    picked = global_top_k([a, b], 3)
    assert [p.tolist() for p in picked] == [[1], [0, 2]]


# ------------------------------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_chooses_the_global_budget_and_keeps_outputs(tiny, family):
    model = tiny.model(family)
    batch = tiny.batch(family)
    before = tiny.logits(model, batch)
    peft = unipeft.attach(model, _fishmask(fraction=0.02))
    assert sparse.needs_prepare(peft)
    chosen = sparse.prepare(peft, _batches(tiny, family))
    assert not sparse.needs_prepare(peft)
    k = round(0.02 * _candidates(peft))
    assert sum(chosen.values()) == k == peft.summary().trainable
    assert all(p.form.chosen == "fisher" for _, p in peft.delta_modules())
    torch.testing.assert_close(tiny.logits(model, batch), before, atol=1e-5, rtol=0)
    expected = compute_fisher_mask(peft, _batches(tiny, family), POSITIONS, k=0.02)
    for module, placed in peft.delta_modules():
        rows = placed.out_slice or (0, expected[module].shape[0])
        assert torch.equal(torch.nonzero(expected[module][rows[0]:rows[1]].reshape(-1)).squeeze(1),
                           placed.form.indices), module


def test_prepare_with_a_count_and_with_a_loss_fn(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, _fishmask(fraction=None, count=17))
    assert peft.summary().trainable == 0  # a count is only known globally: nothing until prepare
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return m(**batch).logits.square().mean()

    sparse.prepare(peft, _batches(tiny, "bert", 2), loss_fn=loss_fn)
    assert peft.summary().trainable == 17 and len(calls) == 2


def test_prepare_is_a_noop_without_fishmask(tiny):
    peft = unipeft.attach(tiny.model("bert"), "lora")
    assert sparse.prepare(peft, []) == {} and not sparse.needs_prepare(peft)
    assert peft.on_step(10, 10) is False


def test_training_the_random_placeholder_warns(tiny):
    peft = unipeft.attach(tiny.model("bert"), "fishmask")
    with pytest.warns(UserWarning, match="prepare"):
        peft.on_step(1, 10)


def test_only_the_chosen_entries_change(tiny):
    model, peft = _prepared(tiny, "bert")
    masks = {m: p.form.delta_weight().detach() != 0 for m, p in peft.delta_modules()}
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    batch = tiny.batch("bert")
    for _ in range(2):
        optimizer.zero_grad()
        tiny.loss(model, batch).backward()
        optimizer.step()
    for module, placed in peft.delta_modules():
        delta = placed.form.delta_weight().detach()
        chosen = torch.zeros(delta.numel(), dtype=torch.bool)
        chosen[placed.form.indices] = True
        assert not delta.reshape(-1)[~chosen].any(), module
        assert not masks[module].any()  # values start at 0


# ------------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("state", ["fishmask", "diff_pruned", "diff_dense"])
@pytest.mark.parametrize("family", FAMILIES)
def test_invariants_after_prepare_and_pruning(tiny, randomize, tmp_path, family, state):
    """Only delta values train; save → load exact; merged == unmerged; detach restores the exact state dict."""
    model = tiny.model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny.batch(family)
    peft = unipeft.attach(model, _fishmask() if state == "fishmask" else _diff())
    if state == "fishmask":
        sparse.prepare(peft, _batches(tiny, family))
        randomize(peft)
    elif state == "diff_pruned":
        randomize(peft, std=0.05)
        assert sparse.prune(peft)
    else:
        randomize(peft, std=0.01)
    adapted = tiny.logits(model, batch)
    assert (adapted - tiny.logits(tiny.model(family), batch)).abs().max() > 1e-5
    values = {id(p.form.values) for _, p in peft.delta_modules()}
    assert {id(p) for p in peft.trainable_parameters()} == values

    folder = peft.save(str(tmp_path / "adapter"))
    fresh = tiny.model(family)
    loaded = unipeft.load_adapter(fresh, folder)
    assert torch.equal(tiny.logits(fresh, batch), adapted)
    for (_, a), (_, b) in zip(loaded.delta_modules(), peft.delta_modules()):
        assert (a.form.indices is None) == (b.form.indices is None)
        if a.form.indices is not None:
            assert torch.equal(a.form.indices, b.form.indices)
    assert {id(p) for p in loaded.trainable_parameters()} == {id(p.form.values) for _, p in loaded.delta_modules()}
    loaded.merge()
    torch.testing.assert_close(tiny.logits(fresh, batch), adapted, atol=1e-5, rtol=0)

    tiny.loss(model, batch).backward()
    peft.detach()
    assert not any(isinstance(m, DeltaSite) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(original)
    for key, value in original.items():
        assert torch.equal(after[key], value), key


def test_adapter_file_grows_with_k(tiny, tmp_path):
    sizes = {}
    for k in (100, 400):
        model = tiny.model("llama")
        peft = unipeft.attach(model, _fishmask(fraction=None, count=k))
        sparse.prepare(peft, _batches(tiny, "llama", 1))
        folder = peft.save(str(tmp_path / f"k{k}"))
        sizes[k] = (folder / "adapter_model.safetensors").stat().st_size
    # an int64 index and a float32 value per entry (the JSON header differs by a few bytes of offsets)
    assert abs(sizes[400] - sizes[100] - 300 * (8 + 4)) <= 64
    dense = sum(p.numel() for n, p in tiny.model("llama").named_parameters()
                if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                               "up_proj.weight", "down_proj.weight")))
    assert sizes[100] < dense * 4 / 10  # far below the float32 weights it adapts


# ------------------------------------------------------------------------------------------------- diff pruning
def test_pruning_keeps_the_largest_global_diffs(tiny, randomize):
    model = tiny.model("t5")
    peft = unipeft.attach(model, _diff(fraction=0.05))
    randomize(peft, std=0.05)
    dense = {m: p.form.values.detach().clone() for m, p in peft.delta_modules()}
    flat = torch.cat([d.abs().reshape(-1) for d in dense.values()])
    k = round(0.05 * flat.numel())
    threshold = flat.topk(k).values.min()
    batch = tiny.batch("t5")
    assert sparse.prune(peft) and not sparse.prune(peft)  # once pruned, nothing is left to prune
    assert peft.summary().trainable == k
    masked = 0.0
    for module, placed in peft.delta_modules():
        keep = dense[module].abs() >= threshold
        assert torch.equal(placed.form.delta_weight().detach(), dense[module] * keep), module
        assert placed.form.chosen == "magnitude"
        masked += float((dense[module] * keep).abs().sum())
    assert masked > 0
    logits = tiny.logits(model, batch)
    assert torch.isfinite(logits).all()


def test_on_step_prunes_at_prune_at(tiny):
    model = tiny.model("bert")
    peft = unipeft.attach(model, _diff(prune_at=0.5))
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-3)
    batch = tiny.batch("bert")
    rebuilt = []
    for step in range(1, 5):
        optimizer.zero_grad()
        tiny.loss(model, batch).backward()
        optimizer.step()
        if peft.on_step(step, 4):
            rebuilt.append(step)
            optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-3)
    assert rebuilt == [2]
    assert peft.summary().trainable == round(0.005 * _candidates(peft))


def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of 'fraction' and 'count'"):
        FishMaskConfig(fraction=None)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 2"):
        DiffPruneConfig(fraction=2.0)
    with pytest.raises(ValueError, match=r"prune_at must be in \[0, 1\], got 1.5"):
        DiffPruneConfig(prune_at=1.5)
    with pytest.raises(ValueError, match="needs a linear site"):
        unipeft.attach(torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(4)}), Recipe(
            name="x", family="selective", deltas=(DeltaSpec(form=FishMaskConfig(), modules=("norm",)),)))


# ------------------------------------------------------------------------------------------------- real data
def _minilm_sst2(folder: str, rows: list[dict]):
    """The real MiniLM as a 2-class classifier and batches of 4 of the given SST-2 rows."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    n = len(rows)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for start in range(0, n, 4):
        chunk = rows[start:start + 4]
        batch = dict(tokenizer([r["sentence"] for r in chunk], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        out.append(batch)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval(), out


def test_fishmask_on_real_sst2_batches_lowers_the_loss(minilm_folder, sst2_rows):
    model, batches = _minilm_sst2(minilm_folder, sst2_rows(8))
    peft = unipeft.attach(model, "fishmask")
    chosen = sparse.prepare(peft, batches)
    assert sum(chosen.values()) == round(0.005 * _candidates(peft))
    optimizer = torch.optim.AdamW(peft.trainable_parameters(), lr=1e-2)
    with torch.no_grad():
        first = sum(model(**b).loss.item() for b in batches)
    for batch in batches:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert sum(model(**b).loss.item() for b in batches) < first
