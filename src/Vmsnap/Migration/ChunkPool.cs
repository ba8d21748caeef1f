namespace Vmsnap.Migration;

/// <summary>
/// Reusable RAM read buffers for the save path. A chunk handed to the VM-state writer by reference
/// (gather mode) comes back when the writer disposes it as the "may free" owner, i.e. after its bytes
/// were written; until then it is not reused. Managed arrays: a chunk the writer never gives back is
/// simply collected, never freed under its feet.
/// </summary>
internal sealed class ChunkPool(int chunkBytes, int keep = 4)
{
    private readonly Stack<Chunk> _free = new();
    private readonly object _lock = new();

    public int ChunkBytes => chunkBytes;

    public Chunk Rent()
    {
        Chunk? chunk = null;
        lock (_lock)
        {
            if (_free.Count > 0) chunk = _free.Pop();
        }
        chunk ??= new Chunk(this, GC.AllocateUninitializedArray<byte>(chunkBytes));
        chunk.Rented();
        return chunk;
    }

    private void Return(Chunk chunk)
    {
        lock (_lock)
        {
            if (_free.Count < keep) _free.Push(chunk);
        }
    }

    /// <summary>One buffer; disposing it gives it back to its pool (once per rental).</summary>
    internal sealed class Chunk(ChunkPool pool, byte[] buffer) : IDisposable
    {
        private int _rented;

        public byte[] Buffer { get; } = buffer;

        internal void Rented() => Volatile.Write(ref _rented, 1);

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _rented, 0) == 1) pool.Return(this);
        }
    }
}
