"""Placeholder replaced below."""
def pbt_trainable(path):
    raise NotImplementedError
