"""The host layer: what the machine running socklab has (packages, accelerators) and the lab's network plumbing.

Nothing here knows about VMs or labs; everything above may call it.
"""
