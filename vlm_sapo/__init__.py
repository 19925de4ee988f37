"""vlm_sapo: RL for vision-language models with SAPO."""
__version__ = "0.1.0"
