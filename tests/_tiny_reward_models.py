"""Tiny random reward models of the REAL architecture classes, saved like hub checkpoints.

Test fixtures: each builder writes a directory that the reward's normal loading code reads exactly as
it reads the published checkpoint, so the tests exercise the real path.
Nothing here downloads anything; tokenizers are built from a byte-level alphabet with no merges.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE (see openai/CLIP `bytes_to_unicode`)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_clip_tokenizer():
    """A character-level `CLIPTokenizer` (no merges): ids 0/1 are start/end of text."""
    from transformers import CLIPTokenizer

    chars = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def tiny_clip_config(projection_dim: int = 16, image_size: int = 32):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tiny_clip_tokenizer()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    vision = dict(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_clip(out_dir: Path, seed: int = 0, projection_dim: int = 16, image_size: int = 32) -> Path:
    """A random `CLIPModel` + `CLIPProcessor` saved with `save_pretrained` (a stand-in for a hub repo)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(projection_dim, image_size)).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tiny_clip_tokenizer(),
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def save_tiny_aesthetic_head(out_dir: Path, embed_dim: int = 16, seed: int = 0, fmt: str = "pth") -> Path:
    """Random weights of the aesthetic MLP (input `embed_dim`) as `.pth` (tensors only) or `.safetensors`."""
    from marble.rewards.clip import aesthetic_mlp

    torch.manual_seed(seed)
    head = aesthetic_mlp()
    head[0] = torch.nn.Linear(embed_dim, 1024)
    # named like the published file: the state dict of a module whose Sequential is called `layers`
    state = {f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out_dir / "head.safetensors"
        save_file(state, str(path))
    else:
        path = out_dir / "head.pth"
        torch.save(state, path)
    return path


def save_tiny_trocr(out_dir: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random TrOCR-style `VisionEncoderDecoderModel` (ViT encoder, TrOCR decoder) + `TrOCRProcessor`."""
    from transformers import (
        TrOCRConfig,
        TrOCRForCausalLM,
        TrOCRProcessor,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    encoder = ViTModel(
        ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=37)
    )  # fmt: skip
    decoder = TrOCRForCausalLM(
        TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=2, decoder_attention_heads=4,
                    decoder_ffn_dim=37, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0, cross_attention_hidden_size=32)
    )  # fmt: skip
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    with (
        torch.no_grad()
    ):  # default init decodes one token forever; wider weights make the text image-dependent
        for p in model.decoder.parameters():
            p.normal_(0.0, 0.5)
    model.config.decoder_start_token_id = 0
    model.config.pad_token_id = 1
    model.config.eos_token_id = 1
    model.generation_config.decoder_start_token_id = 0
    model.generation_config.pad_token_id = 1
    model.generation_config.eos_token_id = 1
    processor = TrOCRProcessor(
        image_processor=ViTImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tok
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def save_tiny_owlv2(out_dir: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random `Owlv2ForObjectDetection` + `Owlv2Processor` (tiny CLIP tokenizer), saved like the hub repo."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    # The published OWLv2 tokenizer pads queries to 16 BPE tokens; this tokenizer spells characters, so
    # "a photo of a triangle" takes 23 of them: 32 positions keep every tiny-world query whole.
    tok.model_max_length = 32
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tok.model_max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    vision = dict(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4,
    )  # fmt: skip
    model = Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    ).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tok
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
