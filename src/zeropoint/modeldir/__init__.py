"""zeropoint's model directory: packed safetensors shards plus a JSON manifest. Loading one back
into a model is models.quantized.load_quantized.

format.py     the layout (file names, the manifest) and reading a directory back as tensors
writer.py     CheckpointWriter, which streams tensors into shards; save_quantized(model)
source.py     a Hugging Face safetensors checkpoint, read header by header and row by row
streaming.py  quantize_checkpoint: a Hugging Face checkpoint into a model directory, tensor by
              tensor, without loading the model
"""
