"""The tiny world's base model: a small SD3-architecture pipeline built from configs, then SAVED.

The trainer and evaluator never use the objects built here: they load the saved directory with the
same `load_pipeline` that loads SD3.5 Medium. What makes the tiny model useful rather than random
(STACK-NOTES): its VAE is trained briefly on synthetic images of coloured shapes, otherwise every latent
decodes to nearly the same image and no pixel reward can move; its latent scaling/shift factors are
measured on those images, as SD3's were; optionally the transformer is pretrained with flow matching so
that base samples already look like shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marble.config import ModelConfig, TinyModelConfig
from marble.data.tiny_world import PALETTE, SHAPES, WORDS, generate_prompts
from marble.io import atomic_write_text, staged_dir
from marble.models.tiny_render import render_batch
from marble.threads import pinned_threads

log = logging.getLogger(__name__)

BUILD_VERSION = 2  # bump when the recipe below changes: it is part of the cache key
# The VAE training below is bit-reproducible only at a fixed torch thread count (CPU kernels split
# their reductions by thread; 1 vs 2 threads gave different weights, and so different benchmark
# figures for two builds of the "same" model). Every build uses this many threads, whatever the caller set.
BUILD_THREADS = 2
BUILD_INFO = "marble_tiny_build.json"
LATENT_CHANNELS = 16  # SD3's latent width


def tiny_model_key(tiny: TinyModelConfig, max_sequence_length: int) -> str:
    blob = json.dumps(
        {"tiny": tiny.model_dump(mode="json"), "max_seq": max_sequence_length, "version": BUILD_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_tiny_model(model_cfg: ModelConfig) -> Path:
    """Directory of the saved tiny pipeline for `model_cfg.tiny`, building it once (cached by hash).

    Safe against concurrent builders: each builds in its own temporary directory and the first rename
    wins; the others discard their copy.
    """
    tiny = model_cfg.tiny or TinyModelConfig()
    root = Path(model_cfg.cache_dir).expanduser()
    target = root / f"tiny-{tiny_model_key(tiny, model_cfg.max_sequence_length)}"
    if (target / BUILD_INFO).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{target.name}.lock"):
        if (target / BUILD_INFO).is_file():  # another process finished it while we waited
            return target
        return _build_into(tiny, target, model_cfg.max_sequence_length)


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive advisory lock so concurrent builders wait instead of building twice (POSIX only).

    Correctness does not depend on it: the rename below is atomic and the first complete build wins.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock, concurrent builders just duplicate work
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_into(tiny: TinyModelConfig, target: Path, max_sequence_length: int) -> Path:
    log.info("building the tiny SD3 model into %s (once; cached by config hash)", target)
    with staged_dir(target, replace=False) as tmp:  # a concurrent builder's finished copy wins
        stats = build_tiny_pipeline(tiny, tmp, max_sequence_length)
        atomic_write_text(tmp / BUILD_INFO, json.dumps(stats, indent=2))
    return target


# ------------------------------------------------------------------------------------------ parts
def _corpus(n: int = 200) -> list[str]:
    extra = [" ".join(PALETTE), " ".join(SHAPES), " ".join(WORDS), "a photo of the text background"]
    return [p for p, _ in generate_prompts(n, seed=12345)] + extra


def build_tokenizers(vocab_size: int):
    """CLIP (byte-level BPE) and T5 (unigram) tokenizers trained on the tiny corpus (STACK-NOTES recipe)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, T5Tokenizer

    corpus = _corpus()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)]:
        vocab.setdefault(tok, len(vocab))
    clip = CLIPTokenizer(vocab=vocab, merges=[]).train_new_from_iterator(corpus, vocab_size=vocab_size)
    chars = sorted(set("".join(corpus)))
    t5_seed = T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, 0.0) for c in chars)], extra_ids=0
    )
    t5 = t5_seed.train_new_from_iterator(corpus, vocab_size=vocab_size)
    clip.model_max_length = 77  # CLIP's position limit; SD3 pads CLIP prompts to it
    t5.model_max_length = 512
    return clip, t5


def build_text_encoders(tiny: TinyModelConfig, clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    h = tiny.text_hidden_size
    encoders = []
    for _ in range(2):  # SD3 has two CLIP encoders (L and G); here two small random ones
        cfg = CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=h, hidden_act="gelu",
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
        )  # fmt: skip
        encoders.append(CLIPTextModelWithProjection(cfg))
    t5_cfg = T5Config(
        vocab_size=len(t5_tok), d_model=h, d_ff=2 * h, d_kv=8, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
        decoder_start_token_id=t5_tok.pad_token_id,
    )  # fmt: skip
    return encoders[0], encoders[1], T5EncoderModel(t5_cfg)


def build_transformer(tiny: TinyModelConfig):
    from diffusers import SD3Transformer2DModel

    inner = tiny.num_attention_heads * tiny.attention_head_dim
    return SD3Transformer2DModel(
        sample_size=tiny.resolution // 8,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=tiny.num_layers,
        attention_head_dim=tiny.attention_head_dim,
        num_attention_heads=tiny.num_attention_heads,
        joint_attention_dim=tiny.text_hidden_size,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * tiny.text_hidden_size,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=96,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )  # fmt: skip  (SD3.5-Medium features: dual attention in block 0, RMS qk-norm)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 16, 16), latent_channels=LATENT_CHANNELS,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.0, shift_factor=0.0,  # measured after training (set_latent_scaling)
    )  # fmt: skip


@torch.no_grad()
def decoded_brightness_std(vae, resolution: int, generator: torch.Generator, n: int = 32) -> float:
    """Std across images of the mean brightness of VAE reconstructions of `n` synthetic images.

    The rendered images themselves vary (std ~0.11); a decoder that ignores its latents gives ~0.
    """
    x = render_batch([None] * n, resolution, generator) * 2 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return float((rec / 2 + 0.5).clamp(0, 1).mean(dim=(1, 2, 3)).std())


@torch.no_grad()
def random_latent_brightness_std(vae, resolution: int, generator: torch.Generator, n: int = 32) -> float:
    """Std across images of the mean brightness of images decoded from unit-Gaussian latents.

    What a pixel reward sees from an untrained policy: latents go through the SD3 scaling/shift first,
    as rollouts' do (STACK-NOTES: a random decoder gives ~0.002).
    """
    from marble.models.sampling import decode_latents

    h = resolution // 8
    z = torch.randn((n, LATENT_CHANNELS, h, h), generator=generator)  # [n, C, h, h]
    return float(decode_latents(vae, z).mean(dim=(1, 2, 3)).std())


def train_vae(vae, tiny: TinyModelConfig, generator: torch.Generator) -> list[float]:
    """MSE + 1e-6 KL on synthetic shapes (STACK-NOTES: 400 steps, batch 32, lr 2e-3 -> usable decoder)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=tiny.vae_lr)
    vae.train()
    losses = []
    for _ in tqdm(
        range(tiny.vae_train_steps), desc="tiny VAE", leave=False, disable=tiny.vae_train_steps == 0
    ):
        x = render_batch([None] * tiny.vae_batch_size, tiny.resolution, generator) * 2 - 1  # [B, 3, H, W]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval()
    return losses


@torch.no_grad()
def set_latent_scaling(vae, tiny: TinyModelConfig, generator: torch.Generator) -> None:
    """SD3-style `shift_factor` / `scaling_factor` so that data latents have mean 0 and std 1."""
    x = render_batch([None] * 64, tiny.resolution, generator) * 2 - 1
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))


def pretrain_transformer(
    pipe, tiny: TinyModelConfig, max_sequence_length: int, generator: torch.Generator
) -> list[float]:
    """Flow matching (x_t = (1-t) x0 + t ε, target ε − x0) on latents of rendered tiny-world prompts."""
    from marble.models.sampling import encode_images, predict_velocity
    from marble.models.text import encode_prompts

    prompts = [p for p, _ in generate_prompts(150, seed=tiny.seed + 1)]
    emb_all = encode_prompts(pipe, prompts, max_sequence_length)
    transformer = pipe.transformer
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=tiny.pretrain_lr)
    losses = []
    batch = 32
    for _ in tqdm(range(tiny.pretrain_steps), desc="tiny transformer", leave=False):
        idx = torch.randint(len(prompts), (batch,), generator=generator)
        images = render_batch([prompts[int(i)] for i in idx], tiny.resolution, generator)
        x0 = encode_images(pipe.vae, images, generator)  # [B, C, h, w]
        t = torch.sigmoid(torch.randn(batch, generator=generator))  # logit-normal timesteps (SD3)
        eps = torch.randn(x0.shape, generator=generator)
        tt = t.view(-1, 1, 1, 1)
        v = predict_velocity(transformer, (1 - tt) * x0 + tt * eps, t, emb_all[idx])
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    transformer.eval()
    return losses


def build_tiny_pipeline(tiny: TinyModelConfig, out_dir: Path, max_sequence_length: int) -> dict:
    """Build, train briefly and `save_pretrained` the tiny pipeline into `out_dir`; returns build stats.

    Deterministic: same config, same torch build and CPU instruction set -> the same weights."""
    with pinned_threads(BUILD_THREADS):
        return _build_tiny_pipeline(tiny, out_dir, max_sequence_length)


def _build_tiny_pipeline(tiny: TinyModelConfig, out_dir: Path, max_sequence_length: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    t0 = time.perf_counter()
    torch.manual_seed(tiny.seed)
    generator = torch.Generator().manual_seed(tiny.seed)
    clip_tok, t5_tok = build_tokenizers(tiny.vocab_size)
    te1, te2, te3 = build_text_encoders(tiny, clip_tok, t5_tok)
    vae = build_vae()
    std_before = decoded_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(1))
    random_before = random_latent_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(2))
    vae_losses = train_vae(vae, tiny, generator)
    set_latent_scaling(vae, tiny, generator)
    std_after = decoded_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(1))
    random_after = random_latent_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(2))
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(tiny), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1.eval(), tokenizer=clip_tok, text_encoder_2=te2.eval(), tokenizer_2=clip_tok,
        text_encoder_3=te3.eval(), tokenizer_3=t5_tok,
    )  # fmt: skip
    pretrain_losses = (
        pretrain_transformer(pipe, tiny, max_sequence_length, generator) if tiny.pretrain_steps else []
    )
    for module in (pipe.transformer, pipe.vae, te1, te2, te3):
        module.eval()  # STACK-NOTES: built-from-config models are in train mode (T5 dropout!)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    stats = {
        "tiny": tiny.model_dump(mode="json"),
        "build_version": BUILD_VERSION,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
        "decoded_brightness_std_untrained_vae": std_before,
        "decoded_brightness_std_trained_vae": std_after,
        "random_latent_brightness_std_untrained_vae": random_before,
        "random_latent_brightness_std_trained_vae": random_after,
        "vae_loss_first_last": [vae_losses[0], vae_losses[-1]] if vae_losses else None,
        "pretrain_loss_first_last": [pretrain_losses[0], pretrain_losses[-1]] if pretrain_losses else None,
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_shift_factor": vae.config.shift_factor,
    }
    log.info(
        "tiny model built in %.1fs: brightness std across images, reconstructions %.4f -> %.4f, "
        "random latents %.4f -> %.4f (untrained -> trained VAE)",
        stats["seconds"],
        std_before,
        std_after,
        random_before,
        random_after,
    )
    return stats
