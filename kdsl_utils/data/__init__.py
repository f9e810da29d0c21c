"""MIRE data: label registry, records, loading/validation, synthetic generator, splits, augmentation."""
