"""The ``transformers`` backend: Qwen2.5-VL in this process.

- ``backend``: ``TransformersBackend`` (sizing, the admission loop over a feed);
- ``loading``: device, dtype and attention; the weights placed and quantized; the memory
  cap and plan at load; the fast paths built and their touchpoints checked at load;
- ``live``: requests made into prompts ahead of the GPU (``LiveSource``);
- ``scheduler``: which prompts are admitted and which slots decode, turn by turn;
- ``slots``: the slot engine (static cache, continuous batching, CUDA graphs);
- ``prefill`` / ``prefill_step`` / ``decode_step``: how prompts get into slots, and the
  arithmetic of a packed prefill, a vision block and one decode step;
- ``patches``: faster forwards for the stock vision tower; ``fp8``: FP8 text weights;
- ``prompts``: what the slot engine takes and gives; ``oom``: out-of-memory handling.
"""
