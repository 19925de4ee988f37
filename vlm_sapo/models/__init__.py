"""Model building and loading: tiny offline Qwen-VL checkpoints, policy loading, chunked logprob recomputation."""
