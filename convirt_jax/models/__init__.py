"""The encoders (torchvision-exact ResNet, Hugging Face-exact BERT) and ConVIRT's dual encoder."""
from convirt_jax.models.bert import BertConfig, BertEncoder, pool_text
from convirt_jax.models.convirt import ConVIRTModel, ProjectionHead, build_model
from convirt_jax.models.resnet import ResNet, resnet_features_dim

__all__ = ["BertConfig", "BertEncoder", "ConVIRTModel", "ProjectionHead", "ResNet", "build_model",
           "pool_text", "resnet_features_dim"]
