"""Leaf code shared by every cdp daemon: formats, crypto, config, RPC builders."""
