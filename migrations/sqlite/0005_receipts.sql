-- 0005: delivery and seen receipts.
--
-- `delivered_at` and `seen_at` were columns from the start (0001) but never set. Now the store thread
-- records them (delivered: in batches, as shards report deliveries; seen: on the client's request),
-- and history filters on them: `undelivered=true` lists what never reached a device, `unseen=true`
-- what no client reported seen. These partial indexes hold only the user's entries still missing the
-- receipt, like `notifications_unread` for `read_at`: once recorded, a row leaves the index, so the
-- filtered page of a 100k inbox that was mostly delivered and seen stays a short range scan.

CREATE INDEX notifications_undelivered ON notifications (user_id, id)
    WHERE delivered_at IS NULL AND user_id IS NOT NULL;

CREATE INDEX notifications_unseen ON notifications (user_id, id)
    WHERE seen_at IS NULL AND user_id IS NOT NULL;
