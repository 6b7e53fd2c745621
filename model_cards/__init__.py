"""Model card templates (Jinja, rendered with huggingface_hub's ModelCard), shipped as hf_attn_variants.model_cards."""
