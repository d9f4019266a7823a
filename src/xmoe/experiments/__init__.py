"""Experiments built from the training code: the paper-style LM comparison (`xmoe reproduce`)."""
