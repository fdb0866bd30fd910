"""Random-weight tiny demo models (SD1.5-shaped) and their catalog manifest.

This is the only package of the shared library that imports torch and diffusers;
nothing else may import it at module level.
"""
