"""gpufusion: GPU-accelerated mosaic image fusion."""
