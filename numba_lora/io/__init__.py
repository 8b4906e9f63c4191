"""File formats: safetensors tensors and PEFT adapter directories, read and written without torch."""
