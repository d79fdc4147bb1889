"""ResNets for the training benchmark, in plain torch.nn (torchvision is not a dependency).

They copy torchvision.models.resnet: the same classes, attribute names
(conv1, bn1, relu, maxpool, layer1..4, avgpool, fc; blocks with conv1/bn1,
conv2/bn2, conv3/bn3 and ``downsample = Sequential(conv, bn)``), the same
forward (one ``nn.ReLU(inplace=True)`` module called after bn1 and bn2 and
after the residual add), the same initialisation and parameter counts. So
BN + activation patterns found here (e.g. by a fusing ``bnfast.convert``) are
the ones a torchvision model has.

- :func:`resnet18_cifar`: the common CIFAR-10 ResNet-18 (3x3 stride-1 stem,
  no max-pool, BasicBlock stages 64/128/256/512, 10 classes): 11,173,962
  parameters.
- :func:`resnet50`: torchvision's ImageNet ResNet-50 v1.5 (7x7 stride-2 stem,
  max-pool, Bottleneck [3, 4, 6, 3] with expansion 4 and the stride on the
  3x3 conv, 1000 classes): 25,557,032 parameters.
- :func:`strip_bn`: the same network without BN, for the no-BN ceiling.
"""

from __future__ import annotations

import torch
from torch import nn


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    # v1.5: the stride sits on the 3x3 conv (conv2), as in torchvision, not on conv1.
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet; ``cifar_stem`` swaps the 7x7/2 conv + max-pool for a
    3x3/1 conv and no pooling, the usual change for 32x32 inputs."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 cifar_stem: bool = False):
        super().__init__()
        self.inplanes = 64
        if cifar_stem:
            self.conv1 = conv3x3(3, self.inplanes)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        # torchvision's initialisation (zero_init_residual=False).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10) -> ResNet:
    """CIFAR-10 ResNet-18: N x 3 x 32 x 32 -> N x num_classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, cifar_stem=True)


def resnet50(num_classes: int = 1000) -> ResNet:
    """torchvision's resnet50(): N x 3 x H x W (224 x 224 in ImageNet training) -> N x num_classes."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def strip_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer (torch's, or a subclass such as bnfast's)
    by nn.Identity, recursively and in place; returns model. A BN module passed
    itself comes back as an nn.Identity."""
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return nn.Identity()
    for name, child in model.named_children():
        stripped = strip_bn(child)
        if stripped is not child:
            model._modules[name] = stripped
    return model
