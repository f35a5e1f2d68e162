"""Input statistics shared by models, pretrained sources and the training loop (timm's
``data/constants.py``): one definition each, read through each model's ``input_mean``/``input_std``."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Google Inception-v3 weights expect inputs scaled to [-1, 1]; torchvision gets
# there with ``transform_input=True``, which our model turns off.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
