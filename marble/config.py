"""The one config tree of marble, shared by the CLI, `params.yaml` and the Kubeflow pipeline.

Every field is documented once (its `description`). Defaults cite their source:
- [NFT]    DiffusionNFT (arXiv 2509.16117), `config/nft.py` of NVlabs/DiffusionNFT;
- [MARBLE] MARBLE (arXiv 2605.06507);
- [ours]   chosen by this project.
The algorithm these fields parameterise: docs/algorithm.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from marble.cluster.layout import layout_problem, valid_process_counts
from marble.cluster.quantity import parse_quantity
from marble.urls import redact_url, refuse_credentials

TINY_MODEL = "tiny"
"""Reserved `model.pretrained` value: build (once, cached by config hash) and load the tiny SD3 world."""


class StrictModel(BaseModel):
    """Base for every config node: unknown keys are refused, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class _SourceBase(StrictModel):
    family: str | None = Field(
        None, description="Family tag given to every prompt of this source (default: the source kind)."
    )
    limit: int | None = Field(None, ge=1, description="Read at most this many prompts from the source.")


class TextSource(_SourceBase):
    kind: Literal["txt"] = "txt"
    path: str = Field(description="Plain text file, one prompt per line (blank lines are refused).")


class JsonlSource(_SourceBase):
    kind: Literal["jsonl"] = "jsonl"
    path: str = Field(
        description="JSONL file; each line an object with a `prompt` field and optional metadata."
    )
    prompt_field: str = Field("prompt", description="Name of the field that holds the prompt.")


class GenEvalSource(_SourceBase):
    kind: Literal["geneval"] = "geneval"
    path: str = Field(description="GenEval metadata JSONL (tag, include/exclude objects, prompt).")


class CsvSource(_SourceBase):
    kind: Literal["csv"] = "csv"
    path: str = Field(description="CSV file with a header row.")
    prompt_column: str = Field("prompt", description="Column that holds the prompt.")


class TinyWorldSource(_SourceBase):
    kind: Literal["tiny_world"] = "tiny_world"
    num_prompts: int = Field(
        96, ge=3, description="Prompts to generate (general, colour, quoted-text families 1:1:1)."
    )
    seed: int = Field(0, description="Seed of the tiny-world prompt generator.")


PromptSource = Annotated[
    TextSource | JsonlSource | GenEvalSource | CsvSource | TinyWorldSource, Field(discriminator="kind")
]


class DvcData(StrictModel):
    """Read the prompt files through DVC (`dvc.api`) from a Git repository and its DVC remote, as a pod
    on a cluster must: the repository's working tree is not in the image. Remote credentials come from
    the environment (the secret `pipeline.dvc_secret`)."""

    repo: str = Field(description="Git URL (or local path) of the DVC project holding the prompt files.")
    rev: str | None = Field(
        None, description="Git revision (commit, tag, branch) to read; null = the default branch."
    )
    remote: str | None = Field(None, description="DVC remote to read from; null = the project's default.")


class DataConfig(StrictModel):
    sources: list[PromptSource] = Field(
        default_factory=lambda: [TinyWorldSource()], min_length=1, description="Prompt sources, mixed."
    )
    root: str | None = Field(
        None,
        description="Directory that relative source paths resolve against (e.g. a path on the cache PVC); "
        "null = the working directory.",
    )
    dvc: DvcData | None = Field(
        None, description="Read source paths through DVC from this repository (overrides data.root)."
    )
    test_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="Held-out share per family (stratified split)."
    )
    split_seed: int = Field(0, description="Seed of the train/test split.")
    on_overlong: Literal["reject", "truncate"] = Field(
        "reject", description="What to do with a prompt longer than the text encoders' token limits."
    )
    on_duplicate: Literal["reject", "drop"] = Field(
        "reject", description="What to do with a prompt that appears twice (after whitespace normalisation)."
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Hard cap on prompt length in characters.")


# -------------------------------------------------------------------------------------------- model
class TinyModelConfig(StrictModel):
    """The CPU world: a tiny SD3-architecture pipeline built from configs (sizes: docs/library-notes.md)."""

    num_layers: int = Field(2, ge=1, description="Transformer blocks.")
    attention_head_dim: int = Field(
        16,
        ge=1,
        description="Per-head width of the transformer (a latent patch has 64 values: 4 x 16 carries one "
        "whole; at 4 x 8 the pretraining loss stayed near 1.0 and colour accuracy fell from 60% to 41%, "
        "docs/tiny-world.md).",
    )
    num_attention_heads: int = Field(4, ge=1, description="Heads of the transformer.")
    text_hidden_size: int = Field(32, ge=8, description="Hidden size of the tiny CLIP and T5 encoders.")
    vocab_size: int = Field(400, ge=64, description="Vocabulary size of the locally trained tokenizers.")
    resolution: int = Field(64, ge=32, description="Image size the tiny VAE is trained at, px.")
    vae_train_steps: int = Field(
        600, ge=0, description="AdamW steps training the tiny VAE on synthetic shapes (docs/tiny-world.md)."
    )
    vae_object_weight: float = Field(
        5.0,
        ge=1,
        description="Weight of the object's pixels in the VAE's reconstruction loss (1: plain MSE). The "
        "dark background is most of each image; unweighted, the VAE kept where objects are but not "
        "their hue (docs/tiny-world.md).",
    )
    vae_batch_size: int = Field(32, ge=1, description="Batch size of the VAE training.")
    vae_lr: float = Field(
        2e-3, gt=0, description="Learning rate of the VAE training (docs/library-notes.md)."
    )
    pretrain_steps: int = Field(
        800,
        ge=0,
        description="Flow-matching pretraining steps of the transformer and text encoders on rendered "
        "tiny-world prompts, so that the model follows its prompts' colour and position "
        "(docs/tiny-world.md; 0: a random transformer).",
    )
    pretrain_lr: float = Field(
        3e-3, gt=0, description="Peak learning rate of the pretraining (cosine decay)."
    )
    pretrain_batch_size: int = Field(32, ge=1, description="Images per pretraining step.")
    pretrain_images: int = Field(
        3072, ge=1, description="Images rendered (and VAE-encoded) once for the pretraining."
    )
    seed: int = Field(0, description="Seed of the tiny model's initialisation and training.")


class ModelConfig(StrictModel):
    pretrained: str = Field(
        TINY_MODEL,
        description="Hub id or local directory of an SD3 pipeline (e.g. stabilityai/stable-diffusion-3.5-medium); "
        "'tiny' builds the tiny CPU world once (cached by config hash) and loads it with the same loader.",
    )
    revision: str | None = Field(None, description="Hub revision (commit hash) to pin.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype of the frozen base model (bfloat16 on GPUs)."
    )
    cache_dir: str = Field(
        ".cache/marble", description="Where built tiny models and hub snapshots are cached."
    )
    offline: bool = Field(
        False,
        description="Never touch the network: load every model from local files (or set HF_HUB_OFFLINE=1).",
    )
    max_sequence_length: int = Field(256, ge=1, le=512, description="T5 token limit [NFT: 128..256].")
    vae_scale_factor: int = Field(8, ge=1, description="Pixel-to-latent downsampling of the VAE (SD3: 8).")
    patch_size: int = Field(2, ge=1, description="Transformer patch size (SD3: 2).")
    tiny: TinyModelConfig | None = Field(
        None, description="Tiny-world model; required when pretrained is 'tiny'."
    )

    @property
    def is_tiny(self) -> bool:
        return self.pretrained == TINY_MODEL

    @property
    def resolution_multiple(self) -> int:
        """Images must be a multiple of this many pixels on each side."""
        return self.vae_scale_factor * self.patch_size

    @model_validator(mode="after")
    def _tiny_needs_tiny_config(self) -> ModelConfig:
        if self.is_tiny and self.tiny is None:
            self.tiny = TinyModelConfig()
        return self


class LoraConfig(StrictModel):
    rank: int = Field(32, ge=1, description="LoRA rank [NFT: 32].")
    alpha: float = Field(64.0, gt=0, description="LoRA alpha [NFT: 64].")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    init: Literal["gaussian", "default"] = Field("gaussian", description="LoRA init [NFT: gaussian].")
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        ],
        min_length=1,
        description="Module name suffixes that get LoRA layers [NFT].",
    )  # fmt: skip


class SamplingConfig(StrictModel):
    """Rollouts of the old policy (docs/algorithm.md §2)."""

    resolution: int = Field(512, ge=16, description="Image side, px [NFT: 512].")
    num_steps: int = Field(25, ge=2, description="Solver steps of a rollout [MARBLE: 25 for multi-reward].")
    guidance_scale: float = Field(
        1.0,
        description="CFG scale of the rollouts: 1.0 only. DiffusionNFT trains the guidance-free policy, so its "
        "rollouts are CFG-free [NFT, MARBLE]; guide evaluation with eval.guidance_scale.",
    )
    group_size: int = Field(24, description="Images per prompt G [MARBLE: 24].")
    prompts_per_epoch: int = Field(48, ge=1, description="Prompts sampled per epoch [MARBLE: 48].")
    batch_size: int = Field(8, ge=1, description="Images generated per forward pass of a rollout.")
    shift: float = Field(3.0, gt=0, description="Flow-matching timestep shift of the scheduler (SD3: 3.0).")

    @property
    def samples_per_epoch(self) -> int:
        return self.group_size * self.prompts_per_epoch

    @field_validator("guidance_scale")
    @classmethod
    def _cfg_free(cls, value: float) -> float:
        # Refused rather than implemented: NFT's loss contrasts the trained velocity with the OLD policy's
        # conditional velocity; guided rollouts would come from another policy than the one in the loss.
        if value != 1.0:
            raise ValueError(
                f"{value} is not supported: training rollouts are CFG-free (1.0), as DiffusionNFT and MARBLE "
                "train the guidance-free policy; use eval.guidance_scale for classifier-free guidance at evaluation"
            )
        return value


class NFTConfig(StrictModel):
    """The DiffusionNFT objective (docs/algorithm.md §3, §5)."""

    beta: float = Field(0.1, gt=0, description="NFT strength β [MARBLE: 0.1 multi-reward; NFT: 1.0 single].")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantage clip C [NFT: 5].")
    kl_weight: float = Field(1e-4, ge=0, description="Weight λ of the KL to the reference [NFT: 1e-4].")
    kl_every: Literal["micro_step", "step"] = Field(
        "micro_step",
        description=(
            "Where the KL is estimated: on every micro-step [NFT], or on one micro-step per optimizer step "
            "(rotating over the step's micro-steps), weighted by their number: an unbiased estimate that "
            "skips the reference forward, and with the per_sample Gram the KL's own backward, on the "
            "others [ours]."
        ),
    )
    std_mode: Literal["global", "group"] = Field(
        "global", description="Advantage std over the whole epoch batch or per prompt group [NFT: global]."
    )
    timestep_fraction: float = Field(
        0.99, gt=0, le=1.0, description="Share of the sampling grid trained [NFT: 0.99]."
    )
    old_decay_rate: float = Field(
        0.001, ge=0, description="η = min(rate · step, cap) for the old policy [NFT]."
    )
    old_decay_cap: float = Field(0.95, ge=0, lt=1.0, description="Cap of η [MARBLE: 0.95; NFT: 0.5].")
    weight_floor: float = Field(1e-5, gt=0, description="Floor of the adaptive per-sample weights [NFT].")


# ------------------------------------------------------------------------------------------ rewards
ApplicabilityRule = Literal["always", "quoted_text", "named_color", "named_position", "geneval_metadata"]
"""Names of the rules deciding which prompts a reward scores (marble/data/applicability.py implements each)."""


class _RewardBase(StrictModel):
    """A reward kind is declared once, by its config class below:
    `class XReward(_RewardBase, scorer="module:Class", applies="rule")` with a `kind` literal (the config
    discriminator). `scorer` is the class in `marble.rewards.<module>` that scores it (imported on first
    use); `applies` is the rule naming the prompts it scores (left out when each reward chooses its own,
    `applies_when`). A class with no parameters of its own may configure several kinds (`PixelReward`,
    its `KINDS` table). The config union `RewardSpec`, the class table
    `marble.rewards.registry.REWARD_KINDS`, the rules of `marble.data.applicability` and the evaluation
    lineage (through the scorer's `artifacts`) derive from it.
    """

    implementation: ClassVar[str]
    applicability: ClassVar[ApplicabilityRule | None]

    def __init_subclass__(
        cls, *, scorer: str | None = None, applies: ApplicabilityRule | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if scorer is not None:
            cls.implementation = f"marble.rewards.{scorer}"
            cls.applicability = applies

    name: str = Field(description="Unique name; metrics are logged as train/reward/<name>.")
    held_out: bool = Field(False, description="Evaluated but never trained on.")
    batch_size: int = Field(16, ge=1, description="Images scored per forward pass.")

    @classmethod
    def declared_kinds(cls) -> dict[str, tuple[str, ApplicabilityRule | None]]:
        """kind -> (implementation, applicability) of every kind this class configures."""
        return {cls.model_fields["kind"].default: (cls.implementation, cls.applicability)}


class JpegCompressibilityReward(_RewardBase, scorer="offline:JpegCompressibilityScorer", applies="always"):
    kind: Literal["jpeg_compressibility"] = "jpeg_compressibility"

    quality: int = Field(95, ge=1, le=100, description="JPEG quality used to measure size [DDPO: 95].")


class PixelReward(_RewardBase):
    """The parameterless offline rewards of the tiny world, computed from the pixels (and the prompt's
    named colour or position): one config class, `kind` picks the scorer and its prompts."""

    kind: Literal["brightness", "colorfulness", "color_match", "edge_detail", "position_match"]
    KINDS: ClassVar[dict[str, tuple[str, ApplicabilityRule]]] = {  # kind: (scorer, applies)
        "brightness": ("offline:BrightnessScorer", "always"),
        "colorfulness": ("offline:ColorfulnessScorer", "always"),
        "color_match": ("offline:ColorMatchScorer", "named_color"),
        "edge_detail": ("offline:EdgeDetailScorer", "quoted_text"),
        "position_match": ("offline:PositionMatchScorer", "named_position"),
    }

    @classmethod
    def declared_kinds(cls) -> dict[str, tuple[str, ApplicabilityRule | None]]:
        return {kind: (f"marble.rewards.{scorer}", rule) for kind, (scorer, rule) in cls.KINDS.items()}


class _HubModelReward(_RewardBase):
    model: str = Field(description="Hub id or local directory of the reward model.")
    revision: str | None = Field(None, description="Hub revision (commit hash) to pin.")
    device: str | None = Field(None, description="Device for the reward model (default: the trainer's).")


class PickScoreReward(_HubModelReward, scorer="clip:PickScoreScorer", applies="always"):
    kind: Literal["pickscore"] = "pickscore"

    model: str = "yuvalkirstain/PickScore_v1"
    processor: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", description="Processor hub id or directory."
    )
    processor_revision: str | None = Field(None, description="Processor revision to pin.")
    scale: float = Field(26.0, gt=0, description="Training scale divisor of the raw score [NFT: /26].")


class ClipScoreReward(_HubModelReward, scorer="clip:ClipScoreScorer", applies="always"):
    kind: Literal["clipscore"] = "clipscore"

    model: str = "openai/clip-vit-large-patch14"


class HPSv21Reward(_HubModelReward, scorer="hps:HPSv21Scorer", applies="always"):
    kind: Literal["hpsv21"] = "hpsv21"

    model: str = "xswu/HPSv2"
    checkpoint_file: str = Field("HPS_v2.1_compressed.pt", description="State dict file inside the repo.")
    architecture: str = Field("ViT-H-14", description="open_clip architecture name.")


class AestheticReward(_HubModelReward, scorer="clip:AestheticScorer", applies="always"):
    kind: Literal["aesthetic"] = "aesthetic"

    model: str = "openai/clip-vit-large-patch14"
    head: str = Field(
        "camenduru/improved-aesthetic-predictor",
        description="Hub id or directory of the LAION improved-aesthetic MLP weights.",
    )
    head_file: str = Field("sac+logos+ava1-l14-linearMSE.pth", description="MLP weights file.")
    head_revision: str | None = Field(None, description="Hub revision (commit hash) of the MLP weights repo.")


class ImageRewardReward(_HubModelReward, scorer="imagereward:ImageRewardScorer", applies="always"):
    kind: Literal["imagereward"] = "imagereward"

    model: str = "THUDM/ImageReward"
    checkpoint_file: str = Field("ImageReward.pt", description="State dict (BLIP + MLP) in the repo.")
    config_file: str = Field("med_config.json", description="BLIP text-encoder (BERT) config in the repo.")
    tokenizer: str = Field("google-bert/bert-base-uncased", description="BERT tokenizer hub id or directory.")
    tokenizer_revision: str | None = Field(None, description="Tokenizer revision to pin.")


class OcrReward(_HubModelReward, scorer="ocr:OcrScorer", applies="quoted_text"):
    kind: Literal["ocr"] = "ocr"

    backend: Literal["trocr", "easyocr", "paddle"] = Field("trocr", description="Recognizer backend.")
    model: str = "microsoft/trocr-base-printed"


class GenEvalReward(_HubModelReward, scorer="geneval:GenEvalScorer", applies="geneval_metadata"):
    kind: Literal["geneval"] = "geneval"

    model: str = Field("google/owlv2-base-patch16-ensemble", description="Object detector.")
    clip_model: str = Field("openai/clip-vit-large-patch14", description="CLIP for zero-shot colour.")
    clip_revision: str | None = Field(None, description="Hub revision (commit hash) of the colour CLIP.")
    detection_threshold: float = Field(
        0.3, gt=0, lt=1, description="Detector score threshold [GenEval: 0.3]."
    )
    count_threshold: float = Field(
        0.9, gt=0, lt=1, description="Score threshold for counting [GenEval: 0.9]."
    )


class HttpReward(_RewardBase, scorer="http:HttpScorer"):
    """A reward served over HTTP (JSON wire format `marble-reward/1`, see marble/rewards/http.py)."""

    kind: Literal["http"] = "http"

    url: str = Field(
        description="http(s) endpoint receiving POST JSON {schema, prompts, metadata, images (base64 PNG)}; "
        "no credentials in it (use token_env)."
    )
    applies_when: ApplicabilityRule = Field(
        "always", description="Which prompts the reward scores (others get NaN without a request)."
    )
    timeout_s: float = Field(
        60.0, gt=0, le=600, description="Deadline of one request: connect, send and the whole reply, seconds."
    )
    retries: int = Field(
        2, ge=0, le=10, description="Retries after a timeout, connection error or 5xx reply."
    )
    backoff_s: float = Field(1.0, ge=0, description="Wait before retry k is backoff_s * 2**k seconds.")
    max_reply_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=1 << 28,
        description="Largest reply body accepted, bytes (a bigger one is an error).",
    )
    token_env: str | None = Field(
        None,
        description="Environment variable holding a bearer token, if any; the pipeline fills it from the "
        "key of the same name in pipeline.reward_token_secret.",
    )
    score_min: float | None = Field(None, description="Documented lower bound of the score.")
    score_max: float | None = Field(None, description="Documented upper bound of the score.")
    out_of_range: Literal["refuse", "clamp"] = Field(
        "refuse",
        description="A score outside score_min..score_max: 'refuse' excludes it (like a non-applicable "
        "prompt), 'clamp' moves it to the bound; both are counted in train/reward_out_of_range/<name>.",
    )

    @field_validator("url")
    @classmethod
    def _http_without_credentials(cls, url: str) -> str:
        scheme, _, rest = url.partition("://")
        if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
            raise ValueError(f"must be an http:// or https:// URL with a host; got {redact_url(url)[:80]!r}")
        return refuse_credentials(
            url,
            "put the token in a Kubernetes secret and name its key in token_env "
            "(the pipeline reads it from pipeline.reward_token_secret)",
        )

    @model_validator(mode="after")
    def _range_ordered(self) -> HttpReward:
        lo, hi = self.score_min, self.score_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"score_min={lo} is above score_max={hi}")
        return self


REWARD_SPECS: tuple[type[_RewardBase], ...] = (
    PixelReward,
    JpegCompressibilityReward,
    PickScoreReward,
    ClipScoreReward,
    HPSv21Reward,
    AestheticReward,
    ImageRewardReward,
    OcrReward,
    GenEvalReward,
    HttpReward,
)
"""Every reward kind's declaration (see `_RewardBase`): add a kind here and nowhere else."""

REWARD_SPEC_BY_KIND: dict[str, type[_RewardBase]] = {
    kind: c for c in REWARD_SPECS for kind in c.declared_kinds()
}

REWARD_KIND_DECLARATIONS: dict[str, tuple[str, ApplicabilityRule | None]] = {
    kind: declaration for c in REWARD_SPECS for kind, declaration in c.declared_kinds().items()
}
"""kind -> (implementing class "module:Class", applicability rule or None), for every reward kind."""

RewardSpec = Annotated[Union[REWARD_SPECS], Field(discriminator="kind")]  # noqa: UP007 (a union of a tuple)


# ---------------------------------------------------------------------------------------- balancers
GramSource = Literal["params", "output", "per_sample"]
"""params: K backward passes (exact); output: output-space gradients (free, approximate); per_sample:
the params Gram from the ONE backward the update needs anyway (docs/algorithm.md §4.1)."""


class _GramBalancer(StrictModel):
    gram_source: GramSource = Field(
        "params",
        description="Gram of parameter gradients (exact, K backwards), of output gradients (free), or "
        "per_sample: of parameter gradients from the update's own backward (exact, one backward).",
    )
    refresh_every: int = Field(10, ge=1, description="Optimizer steps between Gram refreshes [MARBLE: N=10].")
    ema_decay: float | None = Field(
        0.7, ge=0, lt=1, description="EMA ρ of the coefficients; null disables [MARBLE: 0.7]."
    )
    refresh: Literal["micro_batch", "step"] = Field(
        "micro_batch",
        description="micro_batch: every observed micro-step is a refresh of its own [MARBLE]; step: the "
        "refresh step's observed Grams are summed into one solve (docs/algorithm.md §4.6).",
    )
    refresh_micro_steps: Literal["first", "first_slot", "all"] = Field(
        "first",
        description="Micro-steps of a refresh step that feed the Gram: the first [MARBLE], the first "
        "timestep slot of every micro-batch (every sample once), or all. The first refresh step: all.",
    )
    qp_eps: float = Field(1e-9, gt=0, description="osqp absolute and relative tolerance.")
    qp_max_iter: int = Field(20000, ge=10, description="osqp iteration cap.")


class _MGDABalancer(_GramBalancer):
    normalize: Literal["refresh", "batch"] = Field(
        "refresh",
        description="Per-reward norms of γ = α mean|g| / |g_k|: cached at the refresh [MARBLE], or from the "
        "batch being applied (its output-space Gram, free).",
    )
    gamma_cap: float | None = Field(
        None,
        gt=1,
        description="Bound on mean|g| / |g_k| (γ_k <= cap α_k): a reward with a tiny gradient on a batch "
        "cannot take the update; null = unbounded [MARBLE].",
    )


class WeightedSumBalancer(StrictModel):
    kind: Literal["weighted_sum"] = "weighted_sum"
    weights: list[float] | None = Field(
        None, description="One non-negative weight per trained reward, in order."
    )


class EqualBalancer(StrictModel):
    kind: Literal["equal"] = "equal"


class GDPOBalancer(StrictModel):
    """GDPO (arXiv 2601.05242): per-reward group normalisation, weighted sum, batch whitening."""

    kind: Literal["gdpo"] = "gdpo"
    weights: list[float] | None = Field(
        None, description="One non-negative weight per trained reward, in order; null = 1 each [GDPO]."
    )


class MarbleBalancer(_MGDABalancer):
    """marble's default (docs/algorithm.md §4.6): the free output-space Gram summed over every micro-step
    of every optimizer step (one solve per step, EMA over steps), γ normalised by the batch being
    applied and bounded. Chosen by the alignment study (bench/README.md); for the parameter Gram use
    `gram_source: params, refresh_every: 10, refresh_micro_steps: first_slot`."""

    kind: Literal["marble"] = "marble"
    gram_source: GramSource = Field(
        "output", description="Gram of output gradients (free, every micro-step) or of parameters [ours]."
    )
    refresh_every: int = Field(1, ge=1, description="Optimizer steps between Gram refreshes [ours: 1].")
    ema_decay: float | None = Field(0.3, ge=0, lt=1, description="EMA ρ of α over refreshes [ours: 0.3].")
    refresh: Literal["micro_batch", "step"] = "step"
    refresh_micro_steps: Literal["first", "first_slot", "all"] = "all"
    normalize: Literal["refresh", "batch"] = "batch"
    gamma_cap: float | None = Field(50.0, gt=1, description="Bound on mean|g| / |g_k| [ours: 50].")


class MarblePaperBalancer(_MGDABalancer):
    """The paper's schedule as published: α* of the first micro-batch of every N-th step (all micro-steps
    of the first), EMA, cached α and cached norms [MARBLE]."""

    kind: Literal["marble_paper"] = "marble_paper"


class MarbleFullBalancer(_MGDABalancer):
    kind: Literal["marble_full"] = "marble_full"
    gram_source: GramSource = Field(
        "per_sample", description="per_sample: the exact Gram from the update's own backward [ours]."
    )
    refresh_every: int = Field(1, ge=1, description="Exact MGDA every micro-step [MARBLE w/o amortization].")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="EMA ρ; null = exact fresh weights.")
    refresh_micro_steps: Literal["first", "first_slot", "all"] = "all"


class MarbleStepBalancer(_MGDABalancer):
    """Exact MGDA on the optimizer step (ours, docs/algorithm.md §4.6): every reward's gradient from the
    update's own backward (per_sample), summed over the step's micro-steps, one min-norm solve at the
    step's end on their Gram, applied to the step. The update actually applied then has no trained
    reward at an obtuse angle with that reward's step gradient (up to the per_sample residual)."""

    kind: Literal["marble_step"] = "marble_step"
    gram_source: Literal["per_sample"] = Field(
        "per_sample", description="per_sample: every reward's gradient from the update's own backward."
    )
    refresh_every: Literal[1] = Field(1, description="One solve at the end of every optimizer step.")
    ema_decay: None = Field(None, description="None: the step's own α (an EMA would not keep it aligned).")
    refresh: Literal["step"] = Field("step", description="step: one solve on the step's summed gradients.")
    refresh_micro_steps: Literal["all"] = Field("all", description="Every micro-step's gradients are summed.")
    normalize: Literal["refresh"] = Field("refresh", description="γ from the step's own gradient norms.")


class MarbleUBBalancer(_MGDABalancer):
    kind: Literal["marble_ub"] = "marble_ub"
    gram_source: Literal["params", "output"] = "output"
    refresh_every: int = 1
    ema_decay: float | None = None
    refresh_micro_steps: Literal["first", "first_slot", "all"] = "all"


class PCGradBalancer(_GramBalancer):
    kind: Literal["pcgrad"] = "pcgrad"
    ema_decay: float | None = None
    seed: int = Field(0, description="Seed of the random projection order.")


class CAGradBalancer(_GramBalancer):
    kind: Literal["cagrad"] = "cagrad"
    ema_decay: float | None = None
    c: float = Field(0.4, ge=0, description="Conflict-averse radius c [CAGrad: 0.4].")


BalancerConfig = Annotated[
    WeightedSumBalancer
    | EqualBalancer
    | GDPOBalancer
    | MarbleBalancer
    | MarblePaperBalancer
    | MarbleFullBalancer
    | MarbleStepBalancer
    | MarbleUBBalancer
    | PCGradBalancer
    | CAGradBalancer,
    Field(discriminator="kind"),
]


# -------------------------------------------------------------------------------------------- train
class TrainConfig(StrictModel):
    epochs: int = Field(100, ge=1, description="Epochs (rollout + update rounds).")
    micro_batch_size: int = Field(8, ge=1, description="Samples per training micro-step (per process).")
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Sample micro-batches accumulated per optimizer step (each over all trained timesteps).",
    )
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate, constant [NFT: 3e-4].")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas [NFT].")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay [NFT: 1e-4].")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clip [NFT: 1.0].")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="accelerate mixed precision (bf16 on GPUs)."
    )
    seed: int = Field(0, description="Seed of rollouts, timesteps and noise.")
    ema_decay: float = Field(
        0.9, gt=0, lt=1, description="Decay of the evaluation EMA of the weights [NFT: 0.9]."
    )
    export_ema: bool = Field(
        True,
        description="Export the evaluation EMA of the weights as the adapter (what evaluate scores and register "
        "ships), as DiffusionNFT and MARBLE evaluate the EMA [NFT]; false: the trainable weights.",
    )
    checkpoint_every: int = Field(10, ge=1, description="Epochs between checkpoints.")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (older ones are deleted).")
    resume: str = Field("latest", description="'latest', 'none', or a checkpoint directory.")
    max_consecutive_skips: int = Field(
        5, ge=1, description="Abort after this many non-finite steps in a row."
    )
    diagnostics_every: int = Field(0, ge=0, description="Steps between gradient-cosine diagnostics (0: off).")
    log_every: int = Field(1, ge=1, description="Steps between metric log lines.")
    tensorboard: bool = Field(True, description="Also write TensorBoard event files.")
    progress_bar: bool = Field(True, description="Show a progress bar.")


# --------------------------------------------------------------------------------------------- eval
class GateConfig(StrictModel):
    """Promotion gate: when a new adapter may become the champion."""

    max_regression: float = Field(
        0.0, ge=0, description="Tolerated drop of a trained reward's mean, in base std units."
    )
    min_improvement_ci: bool = Field(
        True, description="At least one trained reward must improve with its 95% CI of the delta above 0."
    )
    max_held_out_regression: float = Field(
        0.25, ge=0, description="Tolerated drop of a held-out reward, base std units."
    )
    max_monitor_shift: float = Field(
        0.5, ge=0, description="Tolerated relative change of a hacking monitor vs. base."
    )
    require_not_dominated: bool = Field(
        True, description="Refuse an adapter Pareto-dominated by the champion."
    )


class EvalConfig(StrictModel):
    num_steps: int = Field(40, ge=2, description="Euler steps [MARBLE: 40].")
    guidance_scale: float = Field(1.0, ge=1.0, description="CFG scale [MARBLE: 1.0].")
    resolution: int | None = Field(None, ge=16, description="Image side; null = sampling.resolution.")
    num_prompts: int | None = Field(None, ge=1, description="Held-out prompts evaluated; null = all.")
    images_per_prompt: int = Field(1, ge=1, description="Seeds per prompt.")
    seed: int = Field(1234, description="Base seed; the same seeds are used for base and adapter.")
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for confidence intervals.")
    grid_prompts: int = Field(4, ge=0, description="Prompts shown in the report's image grid.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate.")

    @model_validator(mode="before")
    @classmethod
    def _weights_are_chosen_by_train(cls, data: Any) -> Any:
        if isinstance(data, dict) and "use_ema" in data:
            raise ValueError(
                "eval.use_ema: evaluation scores the adapter the train stage exports; choose its weights "
                "with train.export_ema"
            )
        return data


# ----------------------------------------------------------------------------------------- registry
# A registered model name reaches MLflow's search filter (a small query language with quoted
# strings) and the Model Registry's URLs: a quote, a space or a slash in it would change the query or
# the path, so the name is restricted rather than escaped.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class MlflowRegistry(StrictModel):
    kind: Literal["mlflow"] = "mlflow"
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; null = embedded sqlite under the output directory. No credentials "
        "in it: MLFLOW_TRACKING_TOKEN (or _USERNAME/_PASSWORD) come from pipeline.registry_token_secret.",
    )
    model_name: str = Field(
        "marble-lora",
        pattern=MODEL_NAME_PATTERN,
        description="Registered model name (letters, digits, '.', '_', '-').",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        return refuse_credentials(
            uri,
            "set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) from "
            "the Kubernetes secret pipeline.registry_token_secret, or a database's password through its "
            "driver's environment (e.g. PGPASSWORD)",
        )


class KubeflowRegistry(StrictModel):
    """Defaults reach the Model Registry that Kubeflow 1.10 installs (kubeflow/manifests
    applications/model-registry: Service `model-registry-service` in `kubeflow`, REST on port 8080, plain
    HTTP inside the cluster), from a pod of a profile namespace (its NetworkPolicy admits them)."""

    kind: Literal["kubeflow"] = "kubeflow"
    server_address: str = Field(
        "http://model-registry-service.kubeflow.svc.cluster.local",
        description="Model Registry service address (scheme included; no credentials).",
    )
    port: int = Field(8080, ge=1, le=65535, description="Model Registry REST port.")
    author: str = Field("marble", description="Author recorded on registered versions.")
    model_name: str = Field(
        "marble-lora",
        pattern=MODEL_NAME_PATTERN,
        description="Registered model name (letters, digits, '.', '_', '-').",
    )
    token_env: str = Field("MODEL_REGISTRY_TOKEN", description="Environment variable that holds the token.")
    is_secure: bool = Field(False, description="Use TLS (an https endpoint outside the cluster).")

    @model_validator(mode="after")
    def _check(self) -> KubeflowRegistry:
        scheme = self.server_address.split("://", 1)[0] if "://" in self.server_address else ""
        if scheme and scheme != ("https" if self.is_secure else "http"):
            raise ValueError(
                f"registry.server_address={self.server_address!r} does not match registry.is_secure="
                f"{self.is_secure} (https needs is_secure: true, http needs false)"
            )
        return self

    @field_validator("server_address")
    @classmethod
    def _no_credentials(cls, address: str) -> str:
        return refuse_credentials(
            address,
            "put the token in the Kubernetes secret pipeline.registry_token_secret; it reaches the "
            "register task as the environment variable named by registry.token_env",
        )


RegistryConfig = Annotated[MlflowRegistry | KubeflowRegistry, Field(discriminator="kind")]


# ----------------------------------------------------------------------------------------- pipeline
class Toleration(StrictModel):
    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class TaskResources(StrictModel):
    """Requests, limits and the active deadline of one pipeline task's pod. Profile namespaces with a
    ResourceQuota reject pods without requests and limits, CPU-only tasks included."""

    cpu_request: str = Field(description="CPU request (Kubernetes quantity, e.g. 500m or 4).")
    cpu_limit: str = Field(description="CPU limit.")
    memory_request: str = Field(description="Memory request (e.g. 2Gi).")
    memory_limit: str = Field(description="Memory limit.")
    timeout_s: int = Field(ge=60, description="Pod active deadline (kubernetes.set_timeout), seconds.")

    @model_validator(mode="after")
    def _check(self) -> TaskResources:
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            try:
                too_big = parse_quantity(request) > parse_quantity(limit)
            except ValueError as exc:
                raise ValueError(f"{kind}_request / {kind}_limit: {exc}") from None
            if too_big:
                raise ValueError(f"{kind}_request={request} exceeds {kind}_limit={limit}")
        return self


def _resources(cpu: tuple[str, str], memory: tuple[str, str], hours: float) -> Any:
    return Field(
        default_factory=lambda: TaskResources(
            cpu_request=cpu[0], cpu_limit=cpu[1], memory_request=memory[0], memory_limit=memory[1],
            timeout_s=int(hours * 3600),
        )
    )  # fmt: skip


class PipelineResources(StrictModel):
    """Per-task pod resources. `train` is the pod that trains: the train task itself on one node, each
    PyTorchJob replica when `pipeline.nodes > 1` (the train task then only launches and watches the
    job, with `launcher`'s resources and `train`'s deadline)."""

    prepare_prompts: TaskResources = _resources(("500m", "2"), ("1Gi", "4Gi"), 1)
    cache_reward_models: TaskResources = _resources(("1", "2"), ("4Gi", "8Gi"), 4)
    train: TaskResources = _resources(("4", "8"), ("32Gi", "64Gi"), 24)
    evaluate: TaskResources = _resources(("4", "8"), ("32Gi", "64Gi"), 6)
    register_adapter: TaskResources = _resources(("250m", "1"), ("1Gi", "2Gi"), 0.5)
    launcher: TaskResources = _resources(("250m", "1"), ("512Mi", "1Gi"), 24)
    cleanup: TaskResources = _resources(("100m", "500m"), ("256Mi", "512Mi"), 0.25)


class PipelineConfig(StrictModel):
    name: str = Field("marble", description="Kubeflow pipeline name.")
    pipeline_root: str | None = Field(
        None, description="Artifact root (local dir or s3://...); null = default."
    )
    accelerator_type: str = Field("nvidia.com/gpu", description="Accelerator resource of the GPU tasks.")
    gpus: int = Field(
        1, ge=0, description="Accelerators per GPU task; for training, per node (> 1: one process per GPU)."
    )
    nodes: int = Field(
        1, ge=1, description="Training nodes; > 1 runs training as a PyTorchJob of this many replicas."
    )
    resources: PipelineResources = Field(
        default_factory=PipelineResources, description="Requests, limits and deadlines per task."
    )
    shm_size: str = Field(
        "16Gi", description="Memory-backed /dev/shm of the GPU pods (data loaders, NCCL); counts as memory."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of the GPU tasks.")
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu")],
        description="Tolerations of the GPU tasks.",
    )
    run_as_user: int = Field(
        1000, ge=1, description="Non-root UID of every pod (the images' user); runAsNonRoot is always set."
    )
    cache_pvc: str = Field("marble-cache", description="PVC holding reward/model snapshots and checkpoints.")
    cache_mount: str = Field("/mnt/marble-cache", description="Where the cache PVC is mounted.")
    cache_access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description="Access mode of the cache PVC (as created by manifests/); multi-node needs ReadWriteMany.",
    )
    hub_token_secret: str | None = Field(
        None, description="Kubernetes secret with key HF_TOKEN for gated hub models; null = none injected."
    )
    registry_token_secret: str | None = Field(
        None,
        description="Kubernetes secret with the registry token (key: the variable the registry backend "
        "reads); null = none injected.",
    )
    dvc_secret: str | None = Field(
        None,
        description="Kubernetes secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the DVC "
        "remote of data.dvc; null = none injected.",
    )
    reward_token_secret: str | None = Field(
        None,
        description="Kubernetes secret holding the http rewards' bearer tokens, one key per token_env, "
        "injected into the train and evaluate tasks; needed when an http reward has a token_env.",
    )
    train_retries: int = Field(
        2, ge=0, description="Retries of the training task (it resumes from checkpoints)."
    )
    retry_backoff_s: int = Field(60, ge=0, description="Wait before the first retry (doubles each time).")
    rendezvous_timeout_s: int = Field(
        1800, ge=60, description="How long PyTorchJob processes wait for each other at start-up."
    )
    job_poll_s: float = Field(30.0, gt=0, description="How often the launcher checks the PyTorchJob.")
    job_service_account: str = Field(
        "marble-trainer",
        description="Service account of the PyTorchJob pods (manifests/ creates it; no API token mounted).",
    )
    gang_scheduler: str | None = Field(
        None,
        description="Scheduler name for gang scheduling of PyTorchJob pods (e.g. volcano); the training "
        "operator must run with the same --gang-scheduler-name. null = default scheduler.",
    )
    schedule_cron: str = Field(
        "0 0 3 * * 0", description="Recurring-run cron (KFP 6-field: weekly, Sun 03:00)."
    )

    @property
    def procs_per_node(self) -> int:
        """Training processes per node: one per GPU (one on a CPU-only node)."""
        return max(self.gpus, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        try:
            parse_quantity(self.shm_size)
        except ValueError as exc:
            raise ValueError(f"shm_size: {exc}") from None
        if self.nodes > 1 and self.cache_access_mode != "ReadWriteMany":
            raise ValueError(
                f"pipeline.nodes={self.nodes} needs pipeline.cache_access_mode=ReadWriteMany: every "
                "PyTorchJob replica mounts the cache PVC at once (a ReadWriteOnce volume attaches to one node)"
            )
        return self


# ------------------------------------------------------------------------------------------- root
class MarbleConfig(StrictModel):
    run_name: str = Field("marble", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Name of this run.")
    output_dir: str = Field("outputs", description="Root directory of stage outputs when run from the CLI.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt sources and split.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Training rollouts.")
    nft: NFTConfig = Field(default_factory=NFTConfig, description="NFT objective.")
    rewards: list[RewardSpec] = Field(min_length=1, description="Reward models, trained and held out.")
    balancer: BalancerConfig = Field(
        default_factory=MarbleBalancer, description="How per-reward gradients combine."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation and promotion gate.")
    registry: RegistryConfig = Field(default_factory=MlflowRegistry, description="Model registry.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Kubeflow settings.")

    # ---- derived values
    @property
    def trained_rewards(self) -> list[Any]:
        return [r for r in self.rewards if not r.held_out]

    @property
    def trained_reward_names(self) -> list[str]:
        return [r.name for r in self.trained_rewards]

    @property
    def reward_token_envs(self) -> list[str]:
        """Environment variables holding the http rewards' bearer tokens (keys of the reward token secret)."""
        return sorted({r.token_env for r in self.rewards if isinstance(r, HttpReward) and r.token_env})

    @property
    def num_train_timesteps(self) -> int:
        """Timesteps of the sampling grid trained per sample [NFT: first 99% of a permutation]."""
        return max(1, int(self.sampling.num_steps * self.nft.timestep_fraction))

    @property
    def eval_resolution(self) -> int:
        return self.eval.resolution or self.sampling.resolution

    def config_hash(self) -> str:
        """Stable short hash of the resolved config (recorded in manifests and the registry)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ---- cross-field checks
    def _check_weights(self, weights: list[float]) -> None:
        k = len(self.trained_rewards)
        if len(weights) != k:
            raise ValueError(
                f"balancer.weights has {len(weights)} entries but there are {k} trained rewards "
                f"{self.trained_reward_names}"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"balancer.weights={weights}: weights must be >= 0 with a positive sum")

    @model_validator(mode="after")
    def _check(self) -> MarbleConfig:
        names = [r.name for r in self.rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rewards: names must be unique; repeated: {dupes}")
        if not self.trained_rewards:
            raise ValueError("rewards: every reward is held_out; at least one must be trained")
        s = self.sampling
        if s.group_size < 2:
            raise ValueError(
                f"sampling.group_size={s.group_size}: group advantages need at least 2 images per prompt"
            )
        if s.samples_per_epoch % self.train.micro_batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.train.micro_batch_size} must divide the epoch's samples "
                f"(sampling.group_size x sampling.prompts_per_epoch = {s.samples_per_epoch})"
            )
        micro_batches = s.samples_per_epoch // self.train.micro_batch_size
        if micro_batches % self.train.gradient_accumulation_steps:
            raise ValueError(
                f"train.gradient_accumulation_steps={self.train.gradient_accumulation_steps} must divide the "
                f"epoch's {micro_batches} micro-batches"
            )
        multiple = self.model.resolution_multiple
        for path, res in (("sampling.resolution", s.resolution), ("eval.resolution", self.eval.resolution)):
            if res is not None and res % multiple:
                raise ValueError(
                    f"{path}={res} must be divisible by {multiple} (VAE factor {self.model.vae_scale_factor} "
                    f"x patch size {self.model.patch_size})"
                )
        b = self.balancer
        k = len(self.trained_rewards)
        if isinstance(b, GDPOBalancer) and b.weights is not None:
            self._check_weights(b.weights)
        if isinstance(b, WeightedSumBalancer):
            if b.weights is None:
                raise ValueError(
                    f"balancer.weights: weighted_sum needs one weight per trained reward ({k}: "
                    f"{self.trained_reward_names}); e.g. --set balancer.weights=[{','.join(['1'] * k)}]"
                )
            self._check_weights(b.weights)
        if self.model.is_tiny and self.model.tiny and self.model.tiny.resolution != s.resolution:
            raise ValueError(
                f"sampling.resolution={s.resolution} must equal model.tiny.resolution={self.model.tiny.resolution} "
                "for the tiny model"
            )
        if self.train.resume not in ("latest", "none") and not self.train.resume.strip():
            raise ValueError("train.resume: use 'latest', 'none' or a checkpoint directory")
        self._check_world_size()
        return self

    def _check_world_size(self) -> None:
        """Refuse a cluster layout whose process count cannot split the epoch, naming the ones that can."""
        p = self.pipeline
        problem = layout_problem(self, p.world_size)
        if problem:
            raise ValueError(
                f"pipeline.nodes={p.nodes} x {p.procs_per_node} processes per node (pipeline.gpus={p.gpus}) "
                f"= {p.world_size} training processes cannot split an epoch: {problem}. Valid process "
                f"counts for this config: {', '.join(map(str, valid_process_counts(self)))}"
            )
