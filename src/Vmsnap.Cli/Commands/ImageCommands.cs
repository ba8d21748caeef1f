using System.CommandLine;

namespace Vmsnap.Cli.Commands;

internal static class ImageCommands
{
    internal static IEnumerable<Command> Build()
    {
        yield break;
    }
}
