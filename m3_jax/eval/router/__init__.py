"""The scale router (`--scale auto`): per request, the smallest visual-token scale predicted to answer it.

  features   what the router sees, computed with the checkpoint itself (one cheap prefill at the smallest scale)
  predictor  per scale a penalised logistic regression (optax) from features to P(scale answers)
  policy     the smallest scale whose probability clears a threshold; the calibration table of thresholds
  store      a fitted router: router.json (metadata) + params.npz in a checkpoint's `router/` folder
  fit        `m3 router fit`: labels from `m3 eval` runs at every scale, features, the predictor, the calibration
"""
