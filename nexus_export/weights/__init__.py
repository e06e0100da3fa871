"""Where the weights live: safetensors shards read by offset, the checkpoint's key mapping and checks, pickled
checkpoints converted by opt-in, and the WeightStore that holds every tensor a program uses within a memory budget.

May import the ground floor (errors, memory, naming, ...) only.
"""
