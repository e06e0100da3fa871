"""The model zoo (its entries are this folder's YAML files) and opening a model: a zoo name or a Hugging Face folder,
built on the meta device with its shards indexed and checked.

May import the ground floor, ``weights`` and ``graph``.
"""
