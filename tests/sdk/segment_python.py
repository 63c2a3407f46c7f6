"""Sends identify + track events with the unmodified segment-analytics-python SDK.

usage: segment_python.py HOST WRITE_KEY USER_ID ANONYMOUS_ID EMAIL GZIP(0|1)
Exits non-zero if the SDK reports any error (it calls on_error for non-2xx answers).
"""
import sys

import segment.analytics as analytics

host, write_key, user_id, anonymous_id, email, use_gzip = sys.argv[1:7]
errors = []
analytics.host = host
analytics.write_key = write_key
analytics.gzip = use_gzip == "1"
analytics.max_retries = 0
analytics.on_error = lambda error, items: errors.append(repr(error))

analytics.track(anonymous_id=anonymous_id, event="Product Viewed", properties={"sku": "A-1", "price": 12.5})
analytics.identify(user_id=user_id, anonymous_id=anonymous_id, traits={"email": email, "first_name": "Ada", "plan": "pro"})
analytics.track(user_id=user_id, event="Order Completed", properties={"order_id": "o-1", "total": 99.9})
analytics.page(user_id=user_id, name="Checkout", properties={"path": "/checkout"})
analytics.flush()
analytics.shutdown()

if errors:
    print("sdk errors:", errors, file=sys.stderr)
    sys.exit(1)
print("sent")
