"""Datasets: tfds builders and the input pipeline, small datasets held in host
memory, and the embedded digits dataset."""
