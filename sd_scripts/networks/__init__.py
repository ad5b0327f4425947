"""LoRA networks, key names and the tensor math of the LoRA tools."""
