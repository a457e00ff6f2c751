"""MetaCLIP curation ("Demystifying CLIP Data", Xu et al., ICLR 2024): substring matching of
captions against metadata entries, entry counts, and balancing with threshold t."""
