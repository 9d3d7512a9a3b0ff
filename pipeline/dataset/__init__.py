"""Bring your own data: image folders and tables -> WebDataset shards, label remaps to a head."""
