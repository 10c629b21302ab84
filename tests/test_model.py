"""mtv.py: shapes, per-task gradients, SigLIP parity (parameter counts and a conversion round trip)."""

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import mtv

B, G, L, M = 2, 2, 4, 3  # images, global views (ssl), local views, box slots


@pytest.fixture(scope="module")
def cfg():
    return mtv.build_config("tiny")


def make_batch(cfg, tasks):
    """A collated batch as data.collate makes it, built by hand."""
    torch.manual_seed(0)
    s, n = cfg.vision.image_size, (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    g = G if "ssl" in tasks else 1
    tok = mtv.build_tokenizer(cfg.text)
    batch = {"global": torch.randn(g * B, 3, s, s), "text": tok(["a red cube", "two blue spheres"])}
    if "ssl" in tasks:
        batch["local"] = torch.randn(L * B, 3, s // 2, s // 2)
        batch["ibot_mask"] = torch.rand(B, n) < 0.4
    if "depth" in tasks:
        batch["depth"], batch["depth_valid"] = torch.rand(B, s, s), torch.ones(B, s, s, dtype=torch.bool)
    if "ground" in tasks:
        x0y0 = torch.rand(B, M, 2) * 0.5
        batch["boxes"] = torch.cat([x0y0, x0y0 + 0.3], -1)  # (B, M, 4)
        batch["box_valid"] = torch.tensor([[True, True, False], [True, False, False]])
        batch["name_tokens"] = tok(["red cube", "blue sphere", "green cone"])  # (R=3, T)
        batch["name_id"] = torch.arange(3)
    return batch


EXPECTED = {  # output keys of each task
    "clip": {"img", "txt", "logit_scale", "logit_bias"},
    "ssl": {"dino_global", "dino_local", "ibot", "pooled"},
    "depth": {"depth"},
    "ground": {"region", "name", "ground_logit_scale", "ground_logit_bias"},
}
HEADS = {"ssl": ("dino_head", "ibot_head"), "depth": ("depth_head",), "ground": ("ground_head",)}


def test_configs_and_tokenizer(cfg):
    with pytest.raises(ValueError, match=", ".join(mtv.PRESETS)):
        mtv.build_config("XL/14")
    assert mtv.config_from_dict(asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        mtv.config_from_dict({**asdict(cfg), "vision": {**asdict(cfg.vision), "widht": 3}})
    with pytest.raises(ValueError, match="unknown tasks"):
        mtv.MTV(cfg, tasks=("clip", "segmentation"))
    byte = mtv.build_tokenizer(mtv.TextConfig(context_length=16))
    ids = byte(["ab", "é" * 200, ""])
    assert ids.shape == (3, 16) and ids.dtype == torch.int64
    assert ids[0, :3].tolist() == [ord("a") + 2, ord("b") + 2, 1] and (ids[0, 3:] == 0).all()
    assert ids[1, -1] == 1 and ids[2, 0] == 1  # truncated texts still end in eos
    assert ids[1, :-1].tolist() == [b + 2 for b in ("é" * 200).encode()[:15]]  # bytes, not characters
    with pytest.raises(ValueError, match="vocab_size >= 258"):
        mtv.build_tokenizer(mtv.TextConfig(vocab_size=100))


def test_word_tokenizer(cfg):
    """The tiny preset hashes words: case and spacing do not matter, punctuation marks are tokens,
    every word of the toy world (captions and zero-shot prompts) gets its own id, and the
    grounding names take `name_length` positions."""
    import data
    import evaluate

    tok = mtv.build_tokenizer(cfg.text)
    assert isinstance(tok, mtv.WordTokenizer)
    ids = tok(["A red  cube.", "a RED cube .", "x " * 200])
    assert ids.shape == (3, cfg.text.context_length) and ids.max() < cfg.text.vocab_size
    assert ids[0].tolist() == ids[1].tolist()
    assert ids[0, 4] == 1 and (ids[0, 5:] == 0).all() and len(set(ids[0, :4].tolist())) == 4
    assert ids[2, -1] == 1 and (ids[2, :-1] == ids[2, 0]).all()  # truncated: still ends in eos
    words = set()
    for i in range(300):
        for captions in data.CAPTIONS:
            words |= set(tok.pattern.findall(data.render_scene(0, i, 8, captions)["caption"].lower()))
    for t in evaluate.TOY_TEMPLATES:
        words |= set(tok.pattern.findall(t.format(" ".join(data.COLORS + data.SHAPES)).lower()))
    assert len(words) >= 60 and len({tok.encode(w)[0] for w in words}) == len(words)
    names = data.collate([{"caption": "a red cube", "boxes": torch.zeros(1, 4), "names": ["red cube"]}], tok)
    assert names["name_tokens"].shape == (1, tok.name_length) and tok.name_length < cfg.text.context_length


def test_tiny_shapes(cfg):
    model = mtv.MTV(cfg)
    batch = make_batch(cfg, mtv.ALL_TASKS)
    out = model(batch)
    s, n, d = cfg.vision.image_size, (cfg.vision.image_size // cfg.vision.patch_size) ** 2, cfg.vision.width
    k, k2 = cfg.heads.dino_prototypes, cfg.heads.ibot_prototypes
    shapes = {"img": (B, d), "txt": (B, d), "logit_scale": (), "logit_bias": (), "dino_global": (G * B, k),
              "pooled": (G * B, d), "dino_local": (L * B, k), "ibot": (B, n, k2), "depth": (B, s, s), "region": (3, d), "name": (3, d),
              "ground_logit_scale": (), "ground_logit_bias": ()}
    assert {key: tuple(v.shape) for key, v in out.items()} == shapes
    assert torch.allclose(out["logit_scale"], torch.tensor(10.0)) and out["logit_bias"].item() == -10
    assert torch.allclose(out["img"].norm(dim=-1), torch.ones(B)) and (out["depth"] >= 0).all()
    # the entry points agree with forward on view 0
    view0 = batch["global"][:B]
    assert torch.allclose(model.encode_image(view0), out["img"], atol=1e-5)
    assert torch.allclose(model.encode_text(batch["text"]), out["txt"], atol=1e-5)
    assert torch.allclose(model.predict_depth(view0), out["depth"], atol=1e-5)
    regions = model.embed_regions(view0, batch["boxes"])  # (B, M, D)
    assert torch.allclose(regions[batch["box_valid"]], out["region"], atol=1e-5)
    vis = model.vision(view0, layers=(0, -1))
    assert vis["patch"].shape == (B, n, d) and vis["pooled"].shape == (B, d) and len(vis["layers"]) == 2


def test_ssl_teacher(cfg):
    model = mtv.MTV(cfg, tasks=("ssl",))
    teacher = model.ssl_teacher()
    student = dict(model.named_parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert {k for k, _ in teacher.named_parameters()} == {k for k in student if k.split(".")[0] in
                                                           ("vision", "dino_head", "ibot_head")}
    batch = make_batch(cfg, ("ssl",))
    out = teacher(batch)
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    assert out["dino_global"].shape == (G * B, cfg.heads.dino_prototypes)
    assert out["ibot"].shape == (B, n, cfg.heads.ibot_prototypes)
    unmasked = model.vision(batch["global"])  # the teacher sees the same views without the mask
    assert torch.allclose(out["dino_global"], model.dino_head(unmasked["pooled"]), atol=1e-5)
    with torch.no_grad():  # the EMA update works by name
        for name, t in teacher.named_parameters():
            t.lerp_(student[name], 1 - 0.996)
    with pytest.raises(ValueError, match="ssl"):
        mtv.MTV(cfg, tasks=("clip",)).ssl_teacher()


@pytest.mark.parametrize("task", mtv.ALL_TASKS)
def test_each_task_trains_what_it_uses(cfg, task):
    """A task builds only its own parts, returns only its outputs, and a loss on those outputs reaches
    every trainable parameter except the pooling parts that dense tasks do not read."""
    torch.manual_seed(0)
    model = mtv.MTV(cfg, tasks=(task,))
    for other, heads in HEADS.items():
        assert all(hasattr(model, h) == (other == task) for h in heads)
    assert hasattr(model, "text") == (task in ("clip", "ground"))
    assert (model.vision.mask_token is not None) == (task == "ssl")
    out = model(make_batch(cfg, (task,)))
    assert set(out) == EXPECTED[task]
    sum(v.mul(torch.randn_like(v)).sum() for v in out.values()).backward()  # a surrogate loss
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    unused = {"depth": ("vision.head.",), "ground": ("vision.head.",)}.get(task, ())
    assert no_grad == {n for n, _ in model.named_parameters() if n.startswith(unused)}


def test_position_interpolation(cfg):
    model = mtv.MTV(cfg, tasks=("clip", "depth"))
    vit, grid = model.vision, cfg.vision.image_size // cfg.vision.patch_size
    assert torch.equal(vit.pos_embed_at(grid, grid), vit.pos_embed)
    pos = vit.pos_embed_at(2 * grid, grid)  # (2g * g, W)
    assert pos.shape == (2 * grid * grid, cfg.vision.width)
    # the bicubic path onto the training grid is the identity too, so sizes near it change smoothly
    square = vit.pos_embed.T.reshape(1, -1, grid, grid)
    assert torch.allclose(F.interpolate(square, size=(grid, grid), mode="bicubic"), square, atol=1e-6)
    big = torch.randn(1, 3, 2 * cfg.vision.image_size, 2 * cfg.vision.image_size)
    assert model.encode_image(big).shape == (1, cfg.vision.width)
    assert model.predict_depth(big).shape == (1, *big.shape[-2:])


def test_mask_token_acts_only_through_masked_patches(cfg):
    model = mtv.MTV(cfg, tasks=("ssl",))
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size)
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    none = torch.zeros(B, n, dtype=torch.bool)
    some = torch.zeros(B, n, dtype=torch.bool)
    some[:, :5] = True
    assert torch.equal(model.vision(images)["patch"], model.vision(images, mask=none)["patch"])
    before = {name: model.vision(images, mask=m)["pooled"] for name, m in (("none", none), ("some", some))}
    with torch.no_grad():
        model.vision.mask_token.add_(1.0)
    assert torch.equal(model.vision(images, mask=none)["pooled"], before["none"])
    assert not torch.allclose(model.vision(images, mask=some)["pooled"], before["some"])
    model.vision(images, mask=none)["pooled"].sum().backward()
    assert model.vision.mask_token.grad is None or not model.vision.mask_token.grad.any()


@pytest.mark.parametrize("preset", ["S/16", "B/16", "L/16"])
def test_tower_parameter_counts_equal_siglip(preset):
    transformers = pytest.importorskip("transformers")
    cfg = mtv.build_config(preset)
    v, t = cfg.vision, cfg.text
    config = transformers.SiglipConfig(
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                           num_hidden_layers=v.depth, num_attention_heads=v.heads, intermediate_size=v.mlp_dim),
        text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length, hidden_size=t.width,
                         num_hidden_layers=t.depth, num_attention_heads=t.heads, intermediate_size=t.mlp_dim,
                         pad_token_id=0, bos_token_id=None, eos_token_id=1))
    with torch.device("meta"):
        ours = mtv.MTV(cfg)
        siglip = transformers.SiglipModel(config)
    heads = ("dino_head.", "ibot_head.", "depth_head.", "ground_head.", "ground_logit_", "vision.mask_token")
    towers = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith(heads))
    assert towers == sum(p.numel() for p in siglip.parameters())
    if preset == "B/16":
        assert towers == 203_155_970  # google/siglip-base-patch16-224


def test_siglip_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64),
        text_config=dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16, pad_token_id=0, bos_token_id=None,
                         eos_token_id=1))
    hf = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        hf.logit_scale.fill_(2.0), hf.logit_bias.fill_(-3.0)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 300, (3, 16))

    model = mtv.MTV.from_siglip(hf, tasks=("clip", "depth"))
    assert model.cfg.vision.width == 32 and model.cfg.text.context_length == 16 and model.tasks == ("clip", "depth")
    with torch.no_grad():
        ref_img = F.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
        ref_txt = F.normalize(hf.get_text_features(input_ids=tokens).pooler_output, dim=-1)
        assert (model.encode_image(images) - ref_img).abs().max() < 1e-5
        assert (model.encode_text(tokens) - ref_txt).abs().max() < 1e-5
    assert model.logit_scale.item() == 2.0 and model.logit_bias.item() == -3.0

    back = model.to_siglip()
    assert back.state_dict().keys() == hf.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in hf.state_dict().items())

    # From a directory: the tokenizer saved next to the weights is picked up and stored by path.
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}
    wordlevel = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    wordlevel.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=wordlevel, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    loaded = mtv.MTV.from_siglip(tmp_path)
    assert loaded.cfg.text.tokenizer == str(tmp_path)
    ids = loaded.tokenize(["a cat", "a dog"])
    assert ids.shape == (2, 16) and ids[0, :2].tolist() == [3, 4] and ids[1, 1] == 2
    with torch.no_grad():
        assert (loaded.encode_image(images) - ref_img).abs().max() < 1e-5
    with pytest.raises(ValueError, match="config.json"):
        mtv.MTV.from_siglip(tmp_path / "missing")


def test_load_model_round_trip(cfg, tmp_path):
    model = mtv.MTV(cfg, tasks=("clip", "ground"))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "model_config": model.config_dict(), "step": 3}, path)
    loaded = mtv.load_model(path)
    assert loaded.tasks == ("clip", "ground") and loaded.cfg == cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an mtv checkpoint"):
        mtv.load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        mtv.load_model(tmp_path / "missing.pt")


def test_bench_runs():
    pytest.importorskip("transformers")
    from bench import vit

    assert vit.main(["--preset", "tiny", "--batch", "1", "--warmup", "0", "--iters", "1", "--device", "cpu"]) > 0


def test_ibot_masks_both_global_views(cfg):
    """With a mask on each ssl view (iBOT masks both) the student's iBOT logits cover both views,
    view-major as the views, and only the masked view's patches change; the teacher's targets
    are its unmasked patches of both views."""
    model = mtv.MTV(cfg, ("ssl",)).eval()
    batch = make_batch(cfg, ("ssl",))
    n = batch["ibot_mask"].shape[1]
    batch["ibot_mask_first"] = torch.zeros(B, n, dtype=torch.bool)
    batch["ibot_mask_first"][0, :5] = True
    assert torch.equal(mtv.ibot_masks(batch), torch.cat([batch["ibot_mask_first"], batch["ibot_mask"]]))
    with torch.no_grad():
        out, one = model(batch), model({k: v for k, v in batch.items() if k != "ibot_mask_first"})
        target = model.ssl_teacher()(batch)
    assert out["ibot"].shape[0] == target["ibot"].shape[0] == 2 * B and one["ibot"].shape[0] == B
    with torch.no_grad():  # the teacher's targets: its unmasked patches of the first ssl view, then the last
        views = model.ssl_teacher().vision(batch["global"][-2 * B:])["patch"]
        torch.testing.assert_close(target["ibot"], model.ssl_teacher().ibot_head(views))
    torch.testing.assert_close(out["ibot"][B:], one["ibot"])  # the last view is masked as before
    plain = model({**batch, "ibot_mask_first": torch.zeros(B, n, dtype=torch.bool)})["ibot"][:B]
    changed = (out["ibot"][:B] - plain).abs().amax(-1) > 1e-6  # (B, N): where the first view differs
    assert changed[0].any() and not changed[1].any()  # image 1's first view is unmasked: untouched
