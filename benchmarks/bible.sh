# The King James and World English Bible as plain verse text (mod2imp from libsword-utils, unpacked without
# installing), for the sentence-embedding benchmarks' paraphrase retrieval case. Source it, then: bible_texts DIR
bible_texts() {
    local B=$1
    [[ -f $B/engWEB2015eb.imp ]] && return 0
    echo "[$(date +%H:%M:%S)] Bible translations"
    mkdir -p "$B" && (cd "$B" && apt-get download sword-text-web sword-text-kjv libsword-utils libsword1.9.0 \
        libclucene-core1v5 >/dev/null 2>&1 && for f in *.deb; do dpkg-deb -x "$f" x; done)
    for m in engKJV2006eb engWEB2015eb; do
        (cd "$B/x/usr/share/sword" && SWORD_PATH=$PWD LD_LIBRARY_PATH=$B/x/usr/lib/x86_64-linux-gnu \
            "$B/x/usr/bin/mod2imp" "$m" > "$B/$m.imp")
    done
}
