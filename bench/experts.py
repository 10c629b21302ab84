"""Depth Anything V2 and OWLv2 built offline from their configurations, with random weights, and
saved as model folders that pseudolabel.load_expert loads like downloaded ones.

Random weights cost the same compute as trained ones (the same layers on the same number of
tokens), so these models time and count the real experts without their weights. The sizes are
the published ones, written out here so that nothing is downloaded:

- Depth Anything V2 (Yang et al. 2024; its repository's `model_configs` and the converted
  `depth-anything/Depth-Anything-V2-{Small,Base}-hf` configs): a DINOv2 ViT-S/14 or ViT-B/14 at
  518 px, DPT taps after blocks 3, 6, 9 and 12, neck widths 48-384 / 96-768, fusion width 64 / 128;
  the processor resizes the shorter fitting side to 518 keeping the aspect ratio, to a multiple of 14.
- OWLv2 base-patch16-ensemble (Minderer et al. 2023; `google/owlv2-base-patch16-ensemble`): a CLIP
  ViT-B/16 image tower at 960 x 960 (3,600 patches, one box each), a 12-layer 512-wide text tower
  with 16 positions, 512-d projections; the processor pads every image to a square, then resizes.

One difference: CLIP's 49,408-token BPE vocabulary cannot be built offline, so the OWLv2 folders
get a byte-level tokenizer (one token per character, ids below 512, CLIP's start and end ids).
Entity names then take more of the 16 positions than with BPE; the text tower is a small part of
OWLv2's cost at 960 px either way.
"""

import os

import torch

# Published sizes, keyword arguments of save_depth_anything / save_owlv2 below.
DEPTH_ANYTHING_V2 = {
    "Small": dict(image_size=518, patch=14, hidden=384, layers=12, heads=6, taps=(3, 6, 9, 12),
                  neck=(48, 96, 192, 384), fusion=64),
    "Base": dict(image_size=518, patch=14, hidden=768, layers=12, heads=12, taps=(3, 6, 9, 12),
                 neck=(96, 192, 384, 768), fusion=128),
}
OWLV2_B16 = dict(image_size=960, patch=16, vision=(768, 12, 12, 3072), text=(512, 12, 8, 2048, 16),
                 projection=512, vocab_size=49408)
# What the README's CC3M commands run: name -> (kind, builder, its sizes)
REAL_SIZE = {
    "Depth Anything V2 Small": ("depth", "depth_anything", DEPTH_ANYTHING_V2["Small"]),
    "Depth Anything V2 Base": ("depth", "depth_anything", DEPTH_ANYTHING_V2["Base"]),
    "OWLv2 B/16 ensemble": ("ground", "owlv2", OWLV2_B16),
}


def byte_level_vocab(bos_id=None, eos_id=None):
    """A CLIP-style vocabulary of the 256 byte symbols (and their word-final forms), no merges:
    enough to tokenise any text, one token per character. Start and end tokens follow the 512
    symbols unless their ids are given (CLIP's are 49406 and 49407)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab) if bos_id is None else bos_id
    vocab["<|endoftext|>"] = len(vocab) if eos_id is None else eos_id
    return vocab


def depth_anything(*, image_size, patch, hidden, layers, heads, taps, neck, fusion, head_hidden=32):
    """A randomly initialised Depth Anything (V2): DINOv2 backbone, DPT neck and head."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(image_size=image_size, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=4 * hidden, reshape_hidden_states=False,
                            out_features=[f"stage{i}" for i in taps])
    return DepthAnythingForDepthEstimation(DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=hidden, neck_hidden_sizes=list(neck),
        fusion_hidden_size=fusion, head_hidden_size=head_hidden, patch_size=patch, depth_estimation_type="relative"))


def save_depth_anything(folder, *, image_size, patch, **sizes):
    """A Depth Anything (V2) model folder: the model and DPT's processor."""
    from transformers import DPTImageProcessor

    depth_anything(image_size=image_size, patch=patch, **sizes).save_pretrained(folder)
    # Depth Anything's processor: ImageNet mean/std, bicubic, aspect kept, sides a multiple of the patch.
    DPTImageProcessor(size={"height": image_size, "width": image_size}, keep_aspect_ratio=True,
                      ensure_multiple_of=patch, resample=3, do_pad=False, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def save_owlv2(folder, *, image_size, patch, vision, text, projection, vocab_size=None, zero_box_head=False):
    """An OWLv2 detection model folder with the byte-level tokenizer. vision = (width, layers, heads,
    mlp), text = (width, layers, heads, mlp, positions). With zero_box_head every patch predicts
    OWLv2's prior box (patch-sized, at the patch's lower-right corner), which tests can check."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    if vocab_size is None:
        vocab = byte_level_vocab()
        vocab_size = len(vocab)
    else:
        vocab = byte_level_vocab(vocab_size - 2, vocab_size - 1)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    vw, vl, vh, vm = vision
    tw, tl, th, tm, positions = text
    model = Owlv2ForObjectDetection(Owlv2Config(
        text_config=dict(vocab_size=vocab_size, hidden_size=tw, intermediate_size=tm, num_hidden_layers=tl,
                         num_attention_heads=th, max_position_embeddings=positions, bos_token_id=bos,
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(image_size=image_size, patch_size=patch, hidden_size=vw, intermediate_size=vm,
                           num_hidden_layers=vl, num_attention_heads=vh), projection_dim=projection,
    ))
    if zero_box_head:
        torch.nn.init.zeros_(model.box_head.dense2.weight)
        torch.nn.init.zeros_(model.box_head.dense2.bias)
    model.save_pretrained(folder)
    Owlv2Processor(Owlv2ImageProcessor(size={"height": image_size, "width": image_size}),
                   CLIPTokenizer(vocab=vocab, merges=[], model_max_length=positions)).save_pretrained(folder)
    return folder


BUILDERS = {"depth_anything": save_depth_anything, "owlv2": save_owlv2}


def save_real_size(root, name, seed=0):
    """The folder of one REAL_SIZE expert (built once per root): (kind, folder)."""
    kind, builder, sizes = REAL_SIZE[name]
    folder = os.path.join(root, name.replace(" ", "-").replace("/", ""))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        torch.manual_seed(seed)
        BUILDERS[builder](folder, **sizes)
    return kind, folder


def save_tiny(root, size, seed=0):
    """Depth Anything and OWLv2 with tiny random weights at the toy world's image size: the code
    path of the real experts (processor, model, post-processing) in milliseconds. (depth, owl) folders."""
    torch.manual_seed(seed)
    depth = save_depth_anything(os.path.join(root, "depth"), image_size=size, patch=8, hidden=32, layers=4, heads=2,
                                taps=(1, 2, 3, 4), neck=(16, 32, 32, 32), fusion=32, head_hidden=16)
    owl = save_owlv2(os.path.join(root, "owl"), image_size=size, patch=8, vision=(32, 2, 2, 64),
                     text=(32, 2, 2, 64, 32), projection=32, zero_box_head=True)
    return depth, owl


def photo_samples(n, size=256):
    """n toy scenes as the README's CC3M shards hold their images (img2dataset --image_size 256
    --resize_mode center_crop: size x size): decoded samples as pseudolabel's experts take them,
    {"image": uint8 (size, size, 3), "caption"}. The experts resize them to their own input (Depth
    Anything V2 to 518 x 518, OWLv2 to 960 x 960), so their cost does not depend on size."""
    import data

    return [{"image": (s := data.render_scene(0, i, size))["image"], "caption": s["caption"]} for i in range(n)]
