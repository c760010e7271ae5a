"""The tiny world's base model: a small SD3-architecture pipeline built from configs, then SAVED.

The trainer and evaluator never use the objects built here: they load the saved directory with the
same `load_pipeline` that loads SD3.5 Medium. What makes the tiny model useful rather than random
(docs/library-notes.md): its VAE is trained briefly on synthetic images of coloured shapes, otherwise every latent
decodes to nearly the same image and no pixel reward can move; its latent scaling/shift factors are
measured on those images, as SD3's were; optionally the transformer is pretrained with flow matching so
that base samples already look like shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
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

# Bump when the recipe below changes: it is part of the cache key (5: object-weighted VAE loss;
# 6: positional embeddings one unit apart per token, pretrained transformer and text encoders;
# 7: two build threads, the VAE's learning rate decayed to 0).
BUILD_VERSION = 7
# The VAE training below is bit-reproducible only at a fixed torch thread count (CPU kernels split
# their reductions by thread; 1 vs 2 threads gave different weights, and so different benchmark
# figures for two builds of the "same" model). Every build uses this many threads, whatever the caller set.
# Two: on an idle 2-core machine a VAE step took 0.24 s on two threads and 0.33 s on one, and the whole
# build 267 s against 377 s (docs/tiny-world.md). A machine busy with other work pays more for two: at a
# load of ~6 a step took 9-13 s on two threads and 0.8 s on one (a parallel kernel's threads wait for
# each other at every barrier while preempted), so build it alone (`marble tiny-model`) on such a machine.
BUILD_THREADS = 2
BUILD_INFO = "marble_tiny_build.json"
LATENT_CHANNELS = 16  # SD3's latent width
CLIP_POSITIONS = 77  # CLIP's position limit
TIE_GAP = 2e-4  # unigram scores closer than this are ties (the trainer spaces equal counts by 1e-4)


def tiny_model_key(tiny: TinyModelConfig, max_sequence_length: int) -> str:
    blob = json.dumps(
        {"tiny": tiny.model_dump(mode="json"), "max_seq": max_sequence_length, "version": BUILD_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_model_dir(model_cfg: ModelConfig) -> Path:
    """Where the tiny pipeline of `model_cfg` is saved once built (`<cache_dir>/tiny-<hash>`); it is
    complete when it holds its build record (`BUILD_INFO`)."""
    tiny = model_cfg.tiny or TinyModelConfig()
    root = Path(model_cfg.cache_dir).expanduser()
    return root / f"tiny-{tiny_model_key(tiny, model_cfg.max_sequence_length)}"


def ensure_tiny_model(model_cfg: ModelConfig) -> Path:
    """Directory of the saved tiny pipeline for `model_cfg.tiny`, building it once (cached by hash).

    Safe against concurrent builders: they wait on one lock, and each builds in its own temporary
    directory whose rename is atomic, so the first complete build wins.
    """
    tiny = model_cfg.tiny or TinyModelConfig()
    target = tiny_model_dir(model_cfg)
    if (target / BUILD_INFO).is_file():
        return target
    root = target.parent
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


def build_tokenizers(vocab_size: int, clip_length: int = CLIP_POSITIONS):
    """CLIP (byte-level BPE) and T5 (unigram) tokenizers trained on the tiny corpus (docs/library-notes.md recipe),
    canonicalised so that every build gives the same files (`_canonical_clip`, `_canonical_t5`).

    SD3 pads CLIP prompts to the CLIP tokenizer's `model_max_length` (`clip_length`)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer, T5Tokenizer

    corpus = _corpus()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)]:
        vocab.setdefault(tok, len(vocab))
    seed_clip = CLIPTokenizer(vocab=vocab, merges=[])
    clip = _canonical_clip(seed_clip, corpus, vocab_size)
    chars = sorted(set("".join(corpus)))
    t5_seed = T5Tokenizer(
        vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, 0.0) for c in chars)], extra_ids=0
    )
    t5 = _canonical_t5(t5_seed.train_new_from_iterator(corpus, vocab_size=vocab_size))
    clip.model_max_length = clip_length
    t5.model_max_length = 512
    return clip, t5


def _canonical_clip(seed_tok, corpus: list[str], vocab_size: int):
    """Train CLIP's BPE with every end-of-word token ("e</w>") given its id up front, then rebuild the
    tokenizer from the trained vocabulary and merges.

    The tokenizers BPE trainer numbers end-of-word tokens lazily in hash-map order, so their ids differ
    from run to run, and on equal pair counts it picks the merge with the smaller ids: two trainings of
    one corpus gave different ids (16 of 400) and could give different merges. Declared first (as
    trainer special tokens, sorted), they get fixed ids; the rebuilt tokenizer keeps them as ordinary
    vocabulary, exactly as a CLIP tokenizer has them.
    """
    import json

    from transformers import CLIPTokenizer

    backend = seed_tok.backend_tokenizer
    chars = set()
    for text in corpus:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            chars.update(word)
    suffixed = [c + "</w>" for c in sorted(chars)]
    trained = seed_tok.train_new_from_iterator(corpus, vocab_size=vocab_size, new_special_tokens=suffixed)
    model = json.loads(trained.backend_tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges)


def _canonical_t5(tok):
    """The unigram tokenizer with a canonical order of near-equal pieces and scores rounded to 1e-9.

    The trainer orders pieces of equal count in hash-map order and spaces their scores by 1e-4 (two
    trainings swapped "q" and "z"), and its EM sums in hash-map order (scores differ in the last bits).
    Runs of pieces whose scores lie within TIE_GAP of the previous one keep their score sequence but
    take their pieces in sorted order.
    """
    import json

    from transformers import T5Tokenizer

    vocab = json.loads(tok.backend_tokenizer.to_str())["model"]["vocab"]
    special, pieces = vocab[:3], vocab[3:]  # <pad>, </s>, <unk> as built in build_tokenizers
    runs: list[list[tuple[str, float]]] = []
    for piece, score in pieces:
        if runs and runs[-1][-1][1] - score < TIE_GAP:
            runs[-1].append((piece, score))
        else:
            runs.append([(piece, score)])
    canonical = [
        (piece, round(score, 9))
        for run in runs
        for piece, (_, score) in zip(sorted(p for p, _ in run), run, strict=True)
    ]
    return T5Tokenizer(vocab=[tuple(x) for x in special] + canonical, extra_ids=0)


def clip_length(max_sequence_length: int) -> int:
    """The tiny model's CLIP length: the T5 length + 1 (capped at CLIP's 77 positions). CLIP then keeps
    every token T5 keeps (BOS and EOS vs T5's EOS; marble.data.tokens), and the joint text sequence the
    transformer attends over is 33 + 32 tokens instead of 77 + 32 (pretraining steps ~40% cheaper)."""
    return min(CLIP_POSITIONS, max_sequence_length + 1)


def build_text_encoders(tiny: TinyModelConfig, clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    h = tiny.text_hidden_size
    encoders = []
    for _ in range(2):  # SD3 has two CLIP encoders (L and G); here two small random ones
        cfg = CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CLIP_POSITIONS, projection_dim=h, hidden_act="gelu",
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
    """SD3.5-Medium's architecture at tiny size. When it is pretrained, its output projection starts at
    zero (the model first predicts v = 0, so early steps do not fight a random output layer); an
    unpretrained one keeps its random output layer, through which a LoRA on the attention layers acts."""
    from diffusers import SD3Transformer2DModel

    inner = tiny.num_attention_heads * tiny.attention_head_dim
    model = SD3Transformer2DModel(
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
        # SD3's PatchEmbed spaces its sin-cos grid by (tokens per side) / pos_embed_max_size: SD3.5-Medium's
        # 64 / 192 = 1/3. With 4 x 4 tokens and SD3's 96 the spacing was 1/24 and every token's positional
        # embedding had cosine >= 0.999 with every other's: the model could not tell left from right
        # (docs/tiny-world.md). A maximum equal to the token grid spaces them one unit apart.
        pos_embed_max_size=tiny.resolution // 16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )  # fmt: skip  (SD3.5-Medium features: dual attention in block 0, RMS qk-norm)
    if tiny.pretrain_steps:
        torch.nn.init.zeros_(model.proj_out.weight)
        torch.nn.init.zeros_(model.proj_out.bias)
    return model


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
    as rollouts' do (docs/library-notes.md: a random decoder gives ~0.002).
    """
    from marble.models.sampling import decode_latents

    h = resolution // 8
    z = torch.randn((n, LATENT_CHANNELS, h, h), generator=generator)  # [n, C, h, h]
    return float(decode_latents(vae, z).mean(dim=(1, 2, 3)).std())


OBJECT_THRESHOLD = 0.1
"""A pixel is the object's when some channel is this far (in [-1, 1] units) from the image's median
colour, the background: an object covers less than half of a rendered image."""


def object_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """`[N, 1, H, W]` per-pixel weights of images `x` `[N, 3, H, W]` in [-1, 1]: `weight` on the
    object's pixels, 1 on the background's."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]  # [N, 3, 1, 1]
    on_object = (x - background).abs().amax(dim=1, keepdim=True) > OBJECT_THRESHOLD  # [N, 1, H, W]
    return 1 + (weight - 1) * on_object.to(x.dtype)


def train_vae(vae, tiny: TinyModelConfig, generator: torch.Generator, progress: tqdm) -> list[float]:
    """Object-weighted MSE (`object_weights`, normalised by the mean weight) + 1e-6 KL on rendered
    tiny-world prompts (docs/library-notes.md: batch 32, lr 2e-3 -> usable decoder; docs/tiny-world.md:
    600 steps with the object weighted 5x keep the palette hues)."""
    from marble.models.tiny_pretrain import sample_pretraining_prompts

    # Channels-last: oneDNN's convolutions on these narrow layers ran a training step 22% faster on this
    # machine (0.32 vs 0.42 s on one thread); the weights go back to the default layout before saving.
    vae.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=tiny.vae_lr)
    n_steps = tiny.vae_train_steps
    # Cosine decay to 0: at a constant rate the decoder's hues are those of the last few noisy updates
    # (docs/tiny-world.md: the colour ceiling of the same recipe spread over 70-96% across seeds and
    # thread counts at a constant rate; decayed, it held more of the hard palette colours)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / n_steps)))
    vae.train()
    losses = []
    progress.set_postfix_str("VAE", refresh=False)
    for _ in range(n_steps):
        prompts = sample_pretraining_prompts(tiny.vae_batch_size, generator)
        x = render_batch(prompts, tiny.resolution, generator) * 2 - 1  # [B, 3, H, W]
        w = object_weights(x, tiny.vae_object_weight)  # [B, 1, H, W]
        x = x.contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator)).sample
        loss = (w * (rec - x) ** 2).mean() / w.mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update()
    vae.to(memory_format=torch.contiguous_format)
    vae.eval()
    return losses


@torch.no_grad()
def set_latent_scaling(vae, tiny: TinyModelConfig, generator: torch.Generator) -> None:
    """SD3-style `shift_factor` / `scaling_factor` so that data latents have mean 0 and std 1."""
    from marble.models.tiny_pretrain import sample_pretraining_prompts

    x = render_batch(sample_pretraining_prompts(64, generator), tiny.resolution, generator) * 2 - 1
    z = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std().clamp_min(1e-6)))


def build_tiny_pipeline(tiny: TinyModelConfig, out_dir: Path, max_sequence_length: int) -> dict:
    """Build, train and `save_pretrained` the tiny pipeline into `out_dir`; returns build stats.

    Deterministic: same config, same torch build and CPU instruction set -> the same files. The caller's
    thread count and torch random stream are restored: the build seeds and draws from the stream, and a
    first run (which builds) must go on exactly as a later one (which loads the cache)."""
    with pinned_threads(BUILD_THREADS), torch.random.fork_rng(devices=[]):
        return _build_tiny_pipeline(tiny, out_dir, max_sequence_length)


def _build_tiny_pipeline(tiny: TinyModelConfig, out_dir: Path, max_sequence_length: int) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from marble.models.tiny_pretrain import pretrain

    t0 = time.perf_counter()
    torch.manual_seed(tiny.seed)
    generator = torch.Generator().manual_seed(tiny.seed)
    progress = tqdm(total=tiny.vae_train_steps + tiny.pretrain_steps, desc="tiny model", unit="step")
    with progress:
        clip_tok, t5_tok = build_tokenizers(tiny.vocab_size, clip_length(max_sequence_length))
        te1, te2, te3 = build_text_encoders(tiny, clip_tok, t5_tok)
        vae = build_vae()
        std_before = decoded_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(1))
        vae_losses = train_vae(vae, tiny, generator, progress)
        set_latent_scaling(vae, tiny, generator)
        std_after = decoded_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(1))
        random_after = random_latent_brightness_std(vae, tiny.resolution, torch.Generator().manual_seed(2))
        t_vae = time.perf_counter() - t0
        pipe = StableDiffusion3Pipeline(
            transformer=build_transformer(tiny), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2, tokenizer_2=clip_tok,
            text_encoder_3=te3, tokenizer_3=t5_tok,
        )  # fmt: skip
        pretrain_stats = {}
        if tiny.pretrain_steps:
            progress.set_postfix_str("pretraining", refresh=False)
            pretrain_stats = pretrain(pipe, tiny, max_sequence_length, generator, progress)
        for module in (pipe.transformer, pipe.vae, te1, te2, te3):
            module.eval()  # docs/library-notes.md: built-from-config models are in train mode (T5 dropout!)
        pipe.save_pretrained(str(out_dir), safe_serialization=True)
    stats = {
        "tiny": tiny.model_dump(mode="json"),
        "build_version": BUILD_VERSION,
        "max_sequence_length": max_sequence_length,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_until_vae_trained": round(t_vae, 2),
        "decoded_brightness_std_untrained_vae": std_before,
        "decoded_brightness_std_trained_vae": std_after,
        "random_latent_brightness_std_trained_vae": random_after,
        "vae_loss_first_last": [vae_losses[0], vae_losses[-1]] if vae_losses else None,
        "pretrain": pretrain_stats,
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_shift_factor": vae.config.shift_factor,
    }
    log.info(
        "tiny model built in %.1fs (VAE %.1fs): reconstruction brightness std %.4f -> %.4f; pretraining loss %s",
        stats["seconds"],
        t_vae,
        std_before,
        std_after,
        pretrain_stats or "(no pretraining)",
    )
    return stats
