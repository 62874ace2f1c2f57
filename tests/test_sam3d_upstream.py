"""The parts of the sam3d backend that prepare upstream without running it: the attention
adapter (PyTorch's kernels behind flash-attn's signatures) and the offline config patching.
Upstream itself is not installed in CI; its configs are built here in its own layout."""

from __future__ import annotations

import threading

import pytest
import torch
import yaml

from worker.backends.sam3d import attention, upstream


def block_diagonal_reference(q, k, v, q_lens, k_lens):
    """Upstream's sdpa fallback: one dense call with a -inf block-diagonal mask (float64)."""
    mask = torch.full((sum(q_lens), sum(k_lens)), float("-inf"), dtype=torch.float64)
    qs = ks = 0
    for lq, lk in zip(q_lens, k_lens, strict=True):
        mask[qs : qs + lq, ks : ks + lk] = 0
        qs, ks = qs + lq, ks + lk
    out = torch.nn.functional.scaled_dot_product_attention(
        *(t.double().permute(1, 0, 2)[None] for t in (q, k, v)), attn_mask=mask
    )
    return out[0].permute(1, 0, 2)


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("q_lens,k_lens", [([5, 17, 1], [5, 17, 1]), ([3, 9], [12, 4])])
def test_varlen_adapter_equals_upstreams_block_diagonal_attention(q_lens, k_lens):
    gen = torch.Generator().manual_seed(sum(q_lens))
    heads, dim = 4, 16
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    k = torch.randn(sum(k_lens), heads, dim, generator=gen)
    v = torch.randn(sum(k_lens), heads, dim, generator=gen)
    got = attention.flash_attn_varlen_func(
        q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens)
    )
    ref = block_diagonal_reference(q, k, v, q_lens, k_lens)
    assert got.shape == (sum(q_lens), heads, dim)
    assert torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref) < 1e-5
    packed = attention.flash_attn_varlen_kvpacked_func(
        q, torch.stack([k, v], 1), cu(q_lens), cu(k_lens), max(q_lens), max(k_lens)
    )
    assert torch.allclose(packed, got)


class _Sparse:
    """A SparseTensor's two parts the hint reads: ``layout`` (a slice per object), ``feats``."""

    def __init__(self, feats, lengths):
        self.feats, bounds = feats, cu(lengths).tolist()
        self.layout = [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def test_hinted_lengths_replace_reading_back_the_offsets(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q_lens, k_lens = [6, 2, 9], [4, 8, 3]
    q = torch.randn(sum(q_lens), 2, 8, generator=gen)
    kv = torch.randn(sum(k_lens), 2, 2, 8, generator=gen)
    reads = []
    own_bounds = attention._bounds

    def counting(cu_t, lengths, longest):
        out = own_bounds(cu_t, lengths, longest)
        reads.append(lengths is None or out != [0, *torch.tensor(lengths).cumsum(0).tolist()])
        return out

    monkeypatch.setattr(attention, "_bounds", counting)

    def upstream_like(q_sparse, kv_sparse):  # as upstream: offsets built from the layout
        return attention.flash_attn_varlen_kvpacked_func(
            q_sparse.feats, kv_sparse.feats, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens)
        )

    plain = upstream_like(_Sparse(q, q_lens), _Sparse(kv, k_lens))
    assert reads == [True, True]  # no hint: both offsets read back
    reads.clear()
    hinted = attention.hinted(upstream_like)(_Sparse(q, q_lens), _Sparse(kv, k_lens))
    assert reads == [False, False] and torch.equal(hinted, plain)
    ref = block_diagonal_reference(q, kv[:, 0], kv[:, 1], q_lens, k_lens)
    assert torch.linalg.norm(hinted.double() - ref) / torch.linalg.norm(ref) < 1e-5
    assert getattr(attention._lengths, "value", None) is None  # cleared after the call


def test_a_hint_that_does_not_match_the_offsets_is_ignored():
    offsets = cu([5, 7])
    assert attention._bounds(offsets, [5, 7], 7) == [0, 5, 12]
    assert attention._bounds(offsets, [5, 7, 1], 7) == [0, 5, 12]  # other count: read back
    assert attention._bounds(offsets, [6, 6], 7) == [0, 5, 12]  # other longest: read back
    assert attention._bounds(offsets, None, 7) == [0, 5, 12]


class _OnTheGpu:
    """What ``per_sequence`` reads of a query tensor, as a half-precision CUDA one has it (no
    GPU here: the choice alone is under test; the kernels are in the GPU test below)."""

    is_cuda = True
    dtype = torch.float16


def test_few_flow_steps_keep_every_call_one_varlen_kernel():
    q = _OnTheGpu()
    assert attention.per_sequence(q, 8, 5000, 5000)  # long sequences, no step count known
    assert not attention.per_sequence(q, 8, 2000, 5000)  # too short
    with attention.for_steps(4):  # fast mode: cuDNN's plans would not pay for themselves
        assert not attention.per_sequence(q, 8, 5000, 5000)
        with attention.for_steps(25):
            assert attention.per_sequence(q, 8, 5000, 5000)
        assert not attention.per_sequence(q, 8, 5000, 5000)  # restored on leaving
        seen = []
        thread = threading.Thread(
            target=lambda: seen.append(attention.per_sequence(q, 8, 5000, 5000))
        )
        thread.start()
        thread.join()
        assert seen == [True]  # another thread's calls are not this flow's
    assert attention.per_sequence(q, 8, 5000, 5000)
    with attention.for_steps(None):
        assert attention.per_sequence(q, 8, 5000, 5000)


def test_dense_adapters_take_flash_attn_layouts():
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 7, 3, 4, 8, generator=gen)  # [B, L, 3, H, C]
    out = attention.flash_attn_qkvpacked_func(qkv)
    q, k, v = qkv.unbind(2)
    weights = torch.softmax(torch.einsum("blhc,bmhc->bhlm", q, k) / 8**0.5, -1)
    assert torch.allclose(out, torch.einsum("bhlm,bmhc->blhc", weights, v), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's varlen kernel needs CUDA")
@pytest.mark.parametrize("min_len", [0, 1000], ids=["varlen-kernel", "sdpa-per-sequence"])
def test_varlen_kernel_on_the_gpu_matches_the_reference(monkeypatch, min_len):
    monkeypatch.setattr(attention, "PER_SEQUENCE_MIN_LEN", min_len)
    lens = [300, 1200, 77]
    q, k, v = (torch.randn(sum(lens), 8, 64, device="cuda", dtype=torch.float16) for _ in "qkv")
    got = attention.flash_attn_varlen_func(q, k, v, cu(lens).cuda(), cu(lens).cuda(), 1200, 1200)
    ref = block_diagonal_reference(q.cpu(), k.cpu(), v.cpu(), lens, lens)
    assert torch.linalg.norm(got.cpu().double() - ref) / torch.linalg.norm(ref) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="spconv's sparse tensors need CUDA")
def test_row_group_norms_match_upstreams_sparse_group_norms_on_the_gpu():
    """Upstream's own ``SparseGroupNorm32`` (the mesh tail's: 192 channels in 32 groups, half
    features) on a real spconv-backed sparse tensor of three objects, with and without
    ``sparse.row_group_norms``; the class is restored on leaving it."""
    from worker.backends.sam3d import sparse

    upstream.import_upstream()
    sp = pytest.importorskip("sam3d_objects.model.backbone.tdfy_dit.modules.sparse")
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = [3000, 40000, 700]
    rows = []
    for b, n in enumerate(counts):  # n distinct voxels of a 64^3 grid for object b
        cells = torch.randperm(64**3)[:n]
        xyz = [cells // 4096, cells // 64 % 64, cells % 64]
        rows.append(torch.stack([torch.full((n,), b), *xyz], 1))
    coords = torch.cat(rows).int()
    feats = torch.randn(sum(counts), 192, device="cuda", generator=gen) * 4 + 7
    x = sp.SparseTensor(feats=feats.half(), coords=coords.cuda())
    norm = sp.SparseGroupNorm32(32, 192).cuda()
    own = type(norm).forward
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=gen)
        norm.bias.normal_(generator=gen)
        want = norm(x).feats
        with sparse.row_group_norms(enabled=True) as patched:
            assert type(norm).forward is not own
            got = norm(x).feats
        again = norm(x).feats
    assert patched is True and got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=4e-3)
    assert type(norm).forward is own and torch.equal(again, want)  # upstream's is back


def test_auto_attention_is_varlen_without_flash_attn():
    assert upstream.resolve_attention("auto") == "varlen"  # flash-attn is not installed here
    assert upstream.resolve_attention("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="choose one of"):
        upstream.resolve_attention("fast")


DINO = {"_target_": upstream.DINO_TARGET, "dino_model": "dinov2_vitl14_reg", "input_size": 518}


def checkpoint(folder, moge):
    model = {"module": {"condition_embedder": {"backbone": {"embedder_list": [[dict(DINO), []]]}}}}
    (folder / "ss_generator.yaml").write_text(yaml.safe_dump(model))
    pipeline = {
        "_target_": "sam3d_objects.pipeline.inference_pipeline_pointmap.InferencePipelinePointMap",
        "ss_generator_config_path": "ss_generator.yaml",
        "ss_generator_ckpt_path": "ss_generator.ckpt",
        "compile_model": True,
        "depth_model": {"model": {"pretrained_model_name_or_path": moge}},
    }
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return folder


def test_configs_load_offline_without_touching_the_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    ckpt = checkpoint(tmp_path / "ckpt", "moge/model.pt")
    (ckpt / "moge").mkdir()
    (ckpt / "moge" / "model.pt").write_bytes(b"weights")
    before = {p.name: p.read_text() for p in ckpt.glob("*.yaml")}
    config = upstream.pipeline_config(ckpt, dinov2_dir="/srv/dinov2", workdir=tmp_path / "w")
    assert config.compile_model is False and config.rendering_engine == "pytorch3d"
    assert config.workspace_dir == str(ckpt.resolve())
    assert config.depth_model.model.pretrained_model_name_or_path == str(
        ckpt.resolve() / "moge/model.pt"
    )
    dino = upstream.model_config(config, "ss_generator").module.condition_embedder.backbone
    entry = dino.embedder_list[0][0]
    assert entry.repo_or_dir == "/srv/dinov2" and entry.source == "local"
    assert entry.backbone_kwargs == {"pretrained": False}  # weights come from the checkpoint
    assert {p.name: p.read_text() for p in ckpt.glob("*.yaml")} == before


def test_a_hub_id_for_moge_is_kept_and_a_setting_overrides_it(tmp_path):
    ckpt = checkpoint(tmp_path, "Ruicheng/moge-vitl")
    config = upstream.pipeline_config(ckpt, workdir=tmp_path / "w")
    assert config.depth_model.model.pretrained_model_name_or_path == "Ruicheng/moge-vitl"
    dino = upstream.model_config(config, "ss_generator").module.condition_embedder.backbone
    assert "repo_or_dir" not in dino.embedder_list[0][0]  # upstream's GitHub default stays
    config = upstream.pipeline_config(ckpt, moge_path="/m/model.pt", workdir=tmp_path / "v")
    assert config.depth_model.model.pretrained_model_name_or_path == "/m/model.pt"
