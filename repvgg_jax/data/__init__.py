"""Datasets: tfds builders and the input pipeline, small datasets held in host
memory, and the embedded digits dataset."""

# ImageNet's per-channel mean and standard deviation of RGB pixels scaled to [0, 1], as
# torchvision normalizes. Here, outside the TensorFlow modules, for exports to record.
MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
