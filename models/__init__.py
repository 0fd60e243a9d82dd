"""The hierfl model zoo: one module per model, each with its bundled data and pooling spectrum."""

__all__ = [
    "eight_schools",
    "radon",
    "mnist_heads",
    "cbpp",
    "hospitals",
    "sleepstudy",
    "verbagg",
    "insteval",
    "quality",
    "tribes",
]
