"""Quality signals over the stored image embeddings: LAION's aesthetic predictors and NSFW detectors
from the user's weights (:mod:`pipeline.quality.heads`), as the ``quality`` step
(:mod:`pipeline.quality.stage`)."""
