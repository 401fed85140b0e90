"""Why a sample is dropped: the one list of reasons that the samples stage, the augment stage, the daemon's
counters and the ``streamssl_samples_bad_total`` metric share. A fixed set, so that a metrics label stays
bounded; a test checks that every reason the code emits is in it."""

from __future__ import annotations

BAD_REASONS: tuple[str, ...] = (
    "empty",          # zero-byte image member
    "not_image",      # bytes that are no known image format (a text file named .jpg)
    "truncated",      # an image cut short (a JPEG without its end, a PNG missing chunks)
    "corrupt",        # the image structure or header is broken (bad PNG CRC, broken JPEG markers)
    "too_large",      # more pixels than max_pixels (decompression bombs) or a member over max_member_bytes
    "unsupported",    # no jpg/jpeg/png/webp member, or another image format (gif, bmp, tiff)
    "decode_error",   # the augment stage: the decoder still failed
    "augment_error",  # the augment stage: decoded, but the views could not be made
    "shard_error",    # a shard unreadable, vanished, cut mid-member or with garbage inside: rest skipped
    "refused_url",    # a shard URL whose scheme is not allowed (see urls.check_url)
)
"""Every reason ``on_bad`` is called with."""

OTHER = "other"
"""The metric's label for a reason outside ``BAD_REASONS`` (a bug: the test of the list should catch it)."""

__all__ = ["BAD_REASONS", "OTHER"]
