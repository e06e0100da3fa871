"""The captured program: capture with torch.export (the key/value cache marked), the Structure read from the graph,
the Program over a WeightStore, running it block by block, and the graph edits passes make (surgery, SliceGPT's
rotation and slicing, the Hugging Face folder written back).

May import the ground floor and ``weights``.
"""
