//! The SQL of the database itself and the replicas on it: liveness, the leader, nodes, meta keys (the [`crate::ClusterStore`] half of [`sql_store!`]).

macro_rules! sql_cluster {
    ($Store:ident, $DB:ident, $Row:ty, $Pool:ty, $backend:literal) => {
        #[async_trait]
        impl ClusterStore for $Store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn ping(&self) -> Result<()> {
                sqlx::query("SELECT 1").execute(&self.reader).await.map(|_| ()).map_err(db_err("reach the database"))
            }

            async fn replica_register(&self, id: Uuid) -> Result<()> {
                self.replica_register_impl(id).await
            }

            async fn replica_alive(&self, id: Uuid) -> Result<bool> {
                self.replica_alive_impl(id).await
            }

            async fn replicas_live(&self) -> Result<u32> {
                self.replicas_live_impl().await
            }

            async fn leader_try(&self) -> Result<bool> {
                self.leader_try_impl().await
            }

            async fn log_watch(&self, wake: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<()> {
                self.log_watch_impl(wake).await
            }

            async fn signal_send(&self, channel: &str, payload: &str) -> Result<()> {
                if payload.len() > crate::SIGNAL_MAX {
                    return Err(covm_types::Error::internal(format!(
                        "a signal of {} bytes is longer than {}",
                        payload.len(),
                        crate::SIGNAL_MAX
                    )));
                }
                self.signal_send_impl(channel, payload).await
            }

            async fn signal_watch(
                &self,
                channel: &str,
                on: std::sync::Arc<dyn Fn(String) + Send + Sync>,
            ) -> Result<()> {
                self.signal_watch_impl(channel, on).await
            }

            async fn close(&self) {
                self.close_impl().await
            }

            async fn node_register(&self, node: &str, url: &str, ca_pem: Option<&str>) -> Result<()> {
                let mut tx = self.begin().await?;
                sqlx::query(
                    "INSERT INTO nodes (id, url, updated_at, ca_pem) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, updated_at = excluded.updated_at,
               ca_pem = excluded.ca_pem",
                )
                .bind(node)
                .bind(url)
                .bind(time_to_db(now()))
                .bind(ca_pem)
                .execute(&mut *tx)
                .await
                .map_err(db_err("register a node"))?;
                tx.commit().await.map_err(db_err("commit"))
            }

            async fn node_addr(&self, node: &str) -> Result<Option<NodeAddr>> {
                Ok(sqlx::query("SELECT url, ca_pem FROM nodes WHERE id = $1")
                    .bind(node)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err("read a node"))?
                    .map(|r| NodeAddr { url: r.get("url"), ca_pem: r.get("ca_pem") }))
            }

            async fn meta_get(&self, key: &str) -> Result<Option<String>> {
                Ok(sqlx::query("SELECT value FROM meta WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db_err("read settings"))?
                    .map(|r| r.get("value")))
            }

            async fn meta_set(&self, key: &str, value: &str) -> Result<()> {
                let mut tx = self.begin().await?;
                meta_upsert(&mut tx, key, value).await?;
                tx.commit().await.map_err(db_err("commit"))
            }

            async fn meta_set_logged(&self, key: &str, value: &str, event: NewEvent) -> Result<EventRecord> {
                let mut tx = self.begin().await?;
                meta_upsert(&mut tx, key, value).await?;
                finish(tx, event).await
            }
        }

        async fn meta_upsert(tx: &mut Transaction<'static, $DB>, key: &str, value: &str) -> Result<()> {
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut **tx)
            .await
            .map_err(db_err("write settings"))?;
            Ok(())
        }
    };
}
