"""The semantic response cache: answers to questions already asked, served without the model."""
