"""Typed, validated configuration of the ALBEF model.

Every field has a default and a unit; `__post_init__` rejects bad values with a `ModelConfigError` that
names the field (its attribute path from `ALBEFConfig`, e.g. "vision.image_size", so a config loader can
map it to its own key). Reading YAML is the pipeline's job (one strict dataclass loader);
`config_from_official` builds the config from the dicts of an official ALBEF run (`albef_meta.json`-style
config + HF `bert_config.json`), so parity tests build the model from the fixture's own files rather than
from constants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

__all__ = ["ModelConfigError", "VisionConfig", "TextConfig", "ALBEFConfig", "config_from_official"]


class ModelConfigError(ValueError):
    """A config value out of range. `field` is its attribute path from `ALBEFConfig` ("temp",
    "vision.image_size", "text.fusion_layer"); `value` the rejected value; str() the full message."""

    def __init__(self, message: str, *, field: str, value: Any) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def _check(cond: bool, obj: Any, name: str, value: Any, why: str) -> None:
    """Raise ModelConfigError for `obj.<name>` (a dotted path below `obj` for cross-field checks)."""
    if not cond:
        raise ModelConfigError(
            f"{type(obj).__name__}.{name}={value!r}: {why}", field=obj._field_prefix + name, value=value
        )


def _positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        _check(ok, obj, name, value, "must be a positive int")


def _probabilities(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
        _check(ok, obj, name, value, "must be a float in [0, 1)")


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder (timm VisionTransformer; ALBEF uses ViT-B/16 with qkv bias, LN eps 1e-6)."""

    _field_prefix: ClassVar[str] = "vision."  # where it sits in ALBEFConfig (error paths)

    image_size: int = 256  # pixels, square input; position embeddings are resampled to it
    patch_size: int = 16  # pixels per patch side
    width: int = 768  # channels of every token
    depth: int = 12  # transformer blocks
    num_heads: int = 12  # attention heads per block
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon
    drop_path_rate: float = 0.0  # stochastic depth (ALBEF: none)
    in_chans: int = 3  # image channels
    weight_init: Literal["timm", "fan_in"] = "timm"  # Linear weights of a fresh ViT: "timm" = truncated
    # normal std 0.02 (ViT/DeiT; irrelevant once DeiT weights are loaded); "fan_in" = normal std
    # 1/sqrt(fan_in) (LeCun), which keeps token features apart at a small width (the tiny preset)

    def __post_init__(self) -> None:
        _positive_ints(self, ("image_size", "patch_size", "width", "depth", "num_heads", "in_chans"))
        _check(
            self.weight_init in ("timm", "fan_in"), self, "weight_init", self.weight_init, "must be 'timm' or 'fan_in'"
        )
        _check(
            self.image_size % self.patch_size == 0,
            self,
            "image_size",
            self.image_size,
            f"must be a multiple of patch_size={self.patch_size}",
        )
        _check(
            self.width % self.num_heads == 0,
            self,
            "width",
            self.width,
            f"must be divisible by num_heads={self.num_heads}",
        )
        _check(
            isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0,
            self,
            "mlp_ratio",
            self.mlp_ratio,
            "must be > 0",
        )
        _check(
            isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0,
            self,
            "layer_norm_eps",
            self.layer_norm_eps,
            "must be a float > 0",
        )
        _probabilities(self, ("drop_path_rate",))

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """BERT text encoder (layers < fusion_layer) + fusion encoder (layers >= fusion_layer) + MLM head."""

    _field_prefix: ClassVar[str] = "text."

    vocab_size: int = 30522  # WordPiece vocabulary (bert-base-uncased)
    hidden_size: int = 768  # channels of every token
    num_heads: int = 12  # attention heads (self and cross)
    intermediate_size: int = 3072  # FFN hidden width
    num_layers: int = 12  # text + fusion layers
    fusion_layer: int = 6  # first layer with cross-attention to the image
    max_position_embeddings: int = 512  # longest token sequence
    type_vocab_size: int = 2  # token-type embeddings (always type 0 here)
    layer_norm_eps: float = 1e-12  # BERT post-LN epsilon
    hidden_dropout: float = 0.1  # dropout after embeddings / attention output / FFN (probability)
    attention_dropout: float = 0.1  # dropout on attention probabilities (probability)
    encoder_width: int = 768  # width of the image tokens the fusion layers cross-attend to
    pad_token_id: int = 0  # [PAD] id (used only as the embedding's padding_idx)
    hidden_act: Literal["gelu"] = "gelu"  # exact (erf) GELU, as HF BERT's "gelu"
    initializer_range: float = 0.02  # std of the normal init of a fresh model's embeddings (HF BERT's name)
    weight_init: Literal["bert", "fan_in"] = "bert"  # Linear weights of a fresh encoder: "bert" = normal std
    # initializer_range (HF BERT); "fan_in" = normal std 1/sqrt(fan_in) (LeCun). At width 64, std 0.02 makes
    # every sentence's [CLS] the same vector (mean pairwise cosine 1.0000): the tiny preset uses "fan_in".
    # Layers loaded from a checkpoint (bert-base-uncased, an ALBEF run) ignore both.

    def __post_init__(self) -> None:
        _positive_ints(
            self,
            (
                "vocab_size",
                "hidden_size",
                "num_heads",
                "intermediate_size",
                "num_layers",
                "max_position_embeddings",
                "type_vocab_size",
                "encoder_width",
            ),
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            self,
            "hidden_size",
            self.hidden_size,
            f"must be divisible by num_heads={self.num_heads}",
        )
        _check(
            isinstance(self.fusion_layer, int) and 0 < self.fusion_layer < self.num_layers,
            self,
            "fusion_layer",
            self.fusion_layer,
            f"must be in [1, num_layers={self.num_layers})",
        )
        _check(
            isinstance(self.pad_token_id, int) and 0 <= self.pad_token_id < self.vocab_size,
            self,
            "pad_token_id",
            self.pad_token_id,
            "must be a token id in [0, vocab_size)",
        )
        _check(
            isinstance(self.layer_norm_eps, float) and self.layer_norm_eps > 0,
            self,
            "layer_norm_eps",
            self.layer_norm_eps,
            "must be a float > 0",
        )
        _check(self.hidden_act == "gelu", self, "hidden_act", self.hidden_act, "only 'gelu' is supported")
        _probabilities(self, ("hidden_dropout", "attention_dropout"))
        _check(
            isinstance(self.initializer_range, float) and self.initializer_range > 0,
            self,
            "initializer_range",
            self.initializer_range,
            "must be a float > 0",
        )
        _check(
            self.weight_init in ("bert", "fan_in"), self, "weight_init", self.weight_init, "must be 'bert' or 'fan_in'"
        )

    @classmethod
    def from_hf_bert_config(cls, bert: dict[str, Any], **overrides: Any) -> TextConfig:
        """Read an HF `config.json` of a BERT model (extra HF keys are ignored; ALBEF's own
        `fusion_layer`/`encoder_width` are read when present)."""
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "num_layers": "num_hidden_layers",
            "fusion_layer": "fusion_layer",
            "max_position_embeddings": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps",
            "hidden_dropout": "hidden_dropout_prob",
            "attention_dropout": "attention_probs_dropout_prob",
            "encoder_width": "encoder_width",
            "pad_token_id": "pad_token_id",
            "hidden_act": "hidden_act",
            "initializer_range": "initializer_range",
        }
        kwargs = {ours: bert[theirs] for ours, theirs in names.items() if theirs in bert}
        for name in ("layer_norm_eps", "initializer_range"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        kwargs.update(overrides)
        return cls(**kwargs)


@dataclass(frozen=True)
class ALBEFConfig:
    """The whole pretraining model: encoders, projections, momentum distillation and queues."""

    _field_prefix: ClassVar[str] = ""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection width
    temp: float = 0.07  # initial softmax temperature (learnable, clamped to [0.001, 0.5] in forward)
    queue_size: int = 65536  # momentum features kept per modality (must be a multiple of batch * world)
    momentum: float = 0.995  # EMA coefficient m in theta_m <- m * theta_m + (1 - m) * theta
    mlm_probability: float = 0.15  # fraction of tokens masked for MLM
    queue_seed: int = 0  # seed of the initial random queues: identical on every rank
    momentum_dropout: bool = False  # True: momentum encoders follow train()/eval() (official code);
    # False: they always run in eval mode, giving deterministic distillation targets (dinov2 teacher)
    itm_negatives: Literal["hard", "random", "mixed"] = "hard"  # ITM negatives per image and per text,
    # in-batch: "hard" = drawn by ITC similarity (ALBEF); "random" = uniform; "mixed" = each image's and each
    # text's negative is hard or uniform by a fair coin. From scratch (the tiny preset) a weak ITC makes hard
    # draws uninformative and ITM stays at its 1:2 prior (loss 0.64); uniform negatives teach ITM only coarse
    # matching, which re-ranks ITC's top-k worse than ITC; "mixed" learns both (pretrain_tiny_cpu.yaml).

    def __post_init__(self) -> None:
        _check(isinstance(self.vision, VisionConfig), self, "vision", type(self.vision), "must be a VisionConfig")
        _check(isinstance(self.text, TextConfig), self, "text", type(self.text), "must be a TextConfig")
        _positive_ints(self, ("embed_dim", "queue_size"))
        _check(
            isinstance(self.temp, (int, float)) and 0.001 <= self.temp <= 0.5,
            self,
            "temp",
            self.temp,
            "must be in [0.001, 0.5] (the clamp range)",
        )
        _check(
            isinstance(self.momentum, float) and 0.0 <= self.momentum < 1.0,
            self,
            "momentum",
            self.momentum,
            "must be a float in [0, 1)",
        )
        _check(
            isinstance(self.mlm_probability, float) and 0.0 < self.mlm_probability < 1.0,
            self,
            "mlm_probability",
            self.mlm_probability,
            "must be a float in (0, 1)",
        )
        _check(
            isinstance(self.queue_seed, int) and self.queue_seed >= 0,
            self,
            "queue_seed",
            self.queue_seed,
            "must be an int >= 0",
        )
        _check(
            isinstance(self.momentum_dropout, bool), self, "momentum_dropout", self.momentum_dropout, "must be a bool"
        )
        _check(
            self.itm_negatives in ("hard", "random", "mixed"),
            self,
            "itm_negatives",
            self.itm_negatives,
            "must be 'hard', 'random' or 'mixed'",
        )
        _check(
            self.text.encoder_width == self.vision.width,
            self,
            "text.encoder_width",
            self.text.encoder_width,
            f"must equal vision.width={self.vision.width} (the fusion layers read the ViT tokens)",
        )

    # -- constructors -------------------------------------------------------------------------------------
    @classmethod
    def base(cls, image_size: int = 256, **overrides: Any) -> ALBEFConfig:
        """ALBEF-base: ViT-B/16 + bert-base-uncased (6 text + 6 fusion layers), the paper's model."""
        return cls(vision=VisionConfig(image_size=image_size), text=TextConfig(), **overrides)

    @classmethod
    def tiny(cls, image_size: int = 32, vocab_size: int = 30522, **overrides: Any) -> ALBEFConfig:
        """Test size (a few M params, mostly the vocabulary): runs a step in milliseconds on a CPU.

        Trained from scratch (no checkpoint fits it), so two choices differ from ALBEF-base, both measured
        on the synthetic set (bench/tiny_learning.py, issue 11): 8-px patches (a 64-px image is then an 8x8
        grid; with 16-px patches the 4x4 grid loses the small shapes: a supervised colour probe reached
        ~33% vs 94%) and fan-in weight init in both encoders (BERT's std 0.02 at width 64 collapses every
        text feature onto one vector and ITC stays at chance)."""
        vision = VisionConfig(image_size=image_size, patch_size=8, width=64, depth=2, num_heads=2, weight_init="fan_in")
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_heads=2,
            intermediate_size=128,
            num_layers=4,
            fusion_layer=2,
            encoder_width=64,
            weight_init="fan_in",
        )
        kwargs: dict[str, Any] = {"embed_dim": 32, "queue_size": 64}
        kwargs.update(overrides)
        return cls(vision=vision, text=text, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_from_official(
    albef_config: dict[str, Any], bert_config: dict[str, Any], vit_overrides: dict[str, Any] | None = None
) -> ALBEFConfig:
    """Config of an official ALBEF run.

    Args:
        albef_config: the official YAML config (`image_res`, `vision_width`, `embed_dim`, `temp`,
            `queue_size`, `momentum`, `mlm_probability`).
        bert_config: the HF BERT config with ALBEF's `fusion_layer` and `encoder_width`.
        vit_overrides: timm-style `embed_dim`/`depth`/`num_heads` where the run changed the
            hard-coded ViT-B/16 (empty or None = ViT-B/16).
    """
    vit = dict(vit_overrides or {})
    unknown = sorted(set(vit) - {"embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio"})
    if unknown:
        raise ValueError(f"vit_overrides: unknown key(s) {unknown}")
    vision = VisionConfig(
        image_size=int(albef_config["image_res"]),
        patch_size=vit.get("patch_size", 16),
        width=vit.get("embed_dim", 768),
        depth=vit.get("depth", 12),
        num_heads=vit.get("num_heads", 12),
        mlp_ratio=float(vit.get("mlp_ratio", 4.0)),
    )
    if "vision_width" in albef_config and int(albef_config["vision_width"]) != vision.width:
        raise ValueError(f"albef_config.vision_width={albef_config['vision_width']} != ViT width {vision.width}")
    text = TextConfig.from_hf_bert_config(bert_config)
    kwargs = {k: albef_config[k] for k in ("embed_dim", "queue_size") if k in albef_config}
    kwargs.update({k: float(albef_config[k]) for k in ("temp", "momentum", "mlm_probability") if k in albef_config})
    return ALBEFConfig(vision=vision, text=text, **kwargs)
