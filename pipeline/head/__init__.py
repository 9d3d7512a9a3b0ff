"""The uncertainty head: its model, the cache stream it trains on, training, export."""
