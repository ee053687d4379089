"""Guest images: the recipe, the mmdebstrap build and its cache, the initrd socklab writes, and user kernels."""
