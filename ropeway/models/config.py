"""What the engine needs to know about a Llama-family model, whatever file it came from."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # The model's own RoPE scaling (HF `rope_scaling` / `rope_parameters`, or GGUF rope keys),
    # as a plain dict; the RopePlan reads it.
    rope_scaling: dict = field(default_factory=dict)
    name: str = "model"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
